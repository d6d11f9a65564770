"""Box arithmetic of both conventions: delta decoding, clipping, IoU and NMS.

``plus_one`` is the Caffe pixel-inclusive convention (width = x2 - x1 + 1; boxes clipped to
size - 1; overlaps counted the same way). NMS always runs through torchvision on the boxes' device;
the +1 overlap is exactly torchvision's IoU of boxes whose x2, y2 are moved out by one pixel.

Where an IoU equals the threshold the conventions part: detectron2 (torchvision) suppresses at
IoU > threshold; MILVLG's CPU NMS, which its RPN and its selection run, at float32 IoU >= float32
threshold. :func:`suppression_threshold` turns the second into the first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision

SCALE_CLAMP = math.log(1000.0 / 16)


def decode(deltas: torch.Tensor, boxes: torch.Tensor, weights, plus_one: bool) -> torch.Tensor:
    """Apply ``deltas`` [R, k*4] (dx, dy, dw, dh per class) to ``boxes`` [R,4] -> [R, k*4] boxes."""
    deltas = deltas.float()
    boxes = boxes.float()
    extra = 1.0 if plus_one else 0.0
    widths = boxes[:, 2] - boxes[:, 0] + extra
    heights = boxes[:, 3] - boxes[:, 1] + extra
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[:, 3::4] / wh).clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1
    )
    return out.reshape(deltas.shape)


def clip(boxes: torch.Tensor, height: float, width: float, plus_one: bool) -> torch.Tensor:
    """Boxes [..., 4] clipped to the image: [0, size - 1] with ``plus_one``, [0, size] without."""
    extra = 1.0 if plus_one else 0.0
    x = boxes[..., 0::2].clamp(min=0, max=width - extra)
    y = boxes[..., 1::2].clamp(min=0, max=height - extra)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def box_sides(boxes: torch.Tensor, plus_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    extra = 1.0 if plus_one else 0.0
    return boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra


def _overlap_boxes(boxes: torch.Tensor, plus_one: bool) -> torch.Tensor:
    if not plus_one:
        return boxes
    return torch.cat([boxes[:, :2], boxes[:, 2:] + 1.0], dim=1)


def iou(a: torch.Tensor, b: torch.Tensor, plus_one: bool) -> torch.Tensor:
    return torchvision.ops.box_iou(_overlap_boxes(a.float(), plus_one), _overlap_boxes(b.float(), plus_one))


def suppression_threshold(threshold: float, plus_one: bool) -> float:
    """What torchvision's strict test (float32 IoU > t, compared in double) needs to suppress as each
    convention does: ``threshold`` itself without ``plus_one``; with it, the float32 just below
    float32(``threshold``), since no float32 IoU lies between the two."""
    if not plus_one:
        return threshold
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def overlapping(boxes: torch.Tensor, threshold: float, plus_one: bool) -> torch.Tensor:
    """[R, R]: whether box i suppresses box j in an NMS at ``threshold`` (the rule of :func:`nms`)."""
    return iou(boxes, boxes, plus_one).double() > suppression_threshold(threshold, plus_one)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, plus_one: bool) -> torch.Tensor:
    """Indices kept, by decreasing score."""
    return torchvision.ops.nms(_overlap_boxes(boxes.float(), plus_one), scores.float(), suppression_threshold(threshold, plus_one))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float, plus_one: bool) -> torch.Tensor:
    """NMS within each group (class) independently; indices kept, by decreasing score."""
    return torchvision.ops.batched_nms(
        _overlap_boxes(boxes.float(), plus_one), scores.float(), groups, suppression_threshold(threshold, plus_one)
    )
