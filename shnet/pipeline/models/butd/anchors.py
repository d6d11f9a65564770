"""RPN anchors as detectron2's ``DefaultAnchorGenerator`` makes them (both ports use it): per size,
per aspect ratio (height / width) a box of that area centred on the origin, then shifted to every
res4 position (offset 0: the first anchor centred on pixel 0)."""

from __future__ import annotations

import math

import torch

from .conventions import ANCHOR_RATIOS


def cell_anchors(sizes, ratios=ANCHOR_RATIOS) -> torch.Tensor:
    """[len(sizes) * len(ratios), 4] anchors centred on the origin, size-major."""
    anchors = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """[height*width*A, 4]: the cell anchors shifted to every position, ordered (y, x, anchor)."""
    ys = torch.arange(height, dtype=torch.float32, device=cell.device) * stride
    xs = torch.arange(width, dtype=torch.float32, device=cell.device) * stride
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell.view(1, -1, 4)).reshape(-1, 4)
