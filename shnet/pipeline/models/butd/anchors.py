"""RPN anchors: Caffe's ``generate_anchors`` (ratio-major, rounded integer sizes, pixel-inclusive
corners) for the ``caffe`` convention, detectron2's ``DefaultAnchorGenerator`` (size-major, exact
float sizes, offset 0) for ``d2``. Both give 12 anchors per res4 position at stride 16."""

from __future__ import annotations

import math

import numpy as np
import torch

from .conventions import ANCHOR_RATIOS, ANCHOR_SIZES

BASE_SIZE = 16


def caffe_cell_anchors(base_size: int = BASE_SIZE, ratios=ANCHOR_RATIOS, sizes=ANCHOR_SIZES) -> torch.Tensor:
    """[A,4] anchors around the cell at the origin, as Caffe's generate_anchors (scales = sizes / base)."""
    center = (base_size - 1) / 2.0
    area = float(base_size * base_size)
    anchors = []
    for ratio in ratios:
        ratio_w = np.round(np.sqrt(area / ratio))
        ratio_h = np.round(ratio_w * ratio)
        for size in sizes:
            scale = size / base_size
            w, h = ratio_w * scale, ratio_h * scale
            anchors.append([center - 0.5 * (w - 1), center - 0.5 * (h - 1), center + 0.5 * (w - 1), center + 0.5 * (h - 1)])
    return torch.tensor(anchors, dtype=torch.float32)


def d2_cell_anchors(sizes=ANCHOR_SIZES, ratios=ANCHOR_RATIOS) -> torch.Tensor:
    """[A,4] anchors centred on the origin, as detectron2's DefaultAnchorGenerator."""
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
