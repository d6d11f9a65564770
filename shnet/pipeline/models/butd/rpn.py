"""The region proposal network on res4: a 3x3 conv (512 channels), objectness and anchor deltas, then
per image: decode, clip, drop small boxes, keep the top ``pre_nms_topk``, NMS, keep ``post_nms_topk``.

The order of the steps follows each convention's extractor: MILVLG (``caffe``) clips and filters
every box (sides + 1 > 16 pixels of the original image) before the top-k; detectron2 (``d2``) takes
the top-k first, then clips and drops empty boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import box_coder
from .anchors import cell_anchors, grid_anchors
from .conventions import ANCHORS_PER_POSITION, Convention

HIDDEN_CHANNELS = 512
CAFFE_MIN_SIDE = 16  # MILVLG PROPOSAL_GENERATOR.MIN_SIZE, in original-image pixels


class RPNHead(nn.Module):
    def __init__(self, in_channels: int, convention: Convention):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, HIDDEN_CHANNELS, 3, padding=1)
        self.objectness_logits = nn.Conv2d(HIDDEN_CHANNELS, convention.objectness_channels, 1)
        self.anchor_deltas = nn.Conv2d(HIDDEN_CHANNELS, ANCHORS_PER_POSITION * 4, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(features))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


class RPN(nn.Module):
    """``rpn_head`` plus the proposal selection; parameters named as detectron2's ``proposal_generator``."""

    def __init__(self, in_channels: int, stride: int, convention: Convention):
        super().__init__()
        self.convention = convention
        self.stride = stride
        self.rpn_head = RPNHead(in_channels, convention)
        self.register_buffer("cell_anchors", cell_anchors(convention.anchor_sizes), persistent=False)

    def object_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, A*k, H, W] -> [B, H, W, A] scores to rank anchors by: Caffe's softmax probability of
        "object" (channels: A background then A object), or detectron2's raw sigmoid logit."""
        if self.convention.softmax_objectness:
            b, _, h, w = logits.shape
            logits = F.softmax(logits.float().view(b, 2, ANCHORS_PER_POSITION, h, w), dim=1)[:, 1]
        return logits.float().permute(0, 2, 3, 1)

    def forward(
        self,
        features: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        scales: list[tuple[float, float]],
        pre_nms_topk: int,
        post_nms_topk: int,
        nms_iou: float,
    ) -> list[torch.Tensor]:
        """Proposal boxes [P_i, 4] per image (one resized size, unpadded), in resized-image coordinates, best first."""
        logits, deltas = self.rpn_head(features)
        scores = self.object_scores(logits)
        b, _, height, width = deltas.shape
        deltas = deltas.float().view(b, ANCHORS_PER_POSITION, 4, height, width).permute(0, 3, 4, 1, 2)
        anchors = grid_anchors(self.cell_anchors, height, width, self.stride)
        proposals = []
        for i, (img_h, img_w) in enumerate(image_sizes):
            image_scores = scores[i].reshape(-1)
            image_deltas = deltas[i].reshape(-1, 4)
            boxes = box_coder.decode(image_deltas, anchors, self.convention.rpn_box_weights, self.convention.plus_one)
            select = self._caffe_order if self.convention.plus_one else self._d2_order
            boxes, image_scores = select(boxes, image_scores, img_h, img_w, scales[i], pre_nms_topk)
            keep = box_coder.nms(boxes, image_scores, nms_iou, self.convention.plus_one)[:post_nms_topk]
            proposals.append(boxes[keep])
        return proposals

    @staticmethod
    def _caffe_order(boxes, scores, height, width, scale, topk):
        boxes = box_coder.clip(boxes, height, width, plus_one=True)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        boxes, scores = boxes[keep], scores[keep]
        widths, heights = box_coder.box_sides(boxes, plus_one=True)
        keep = (widths > CAFFE_MIN_SIDE * scale[0]) & (heights > CAFFE_MIN_SIDE * scale[1])
        boxes, scores = boxes[keep], scores[keep]
        order = torch.sort(scores, descending=True, stable=True).indices[:topk]
        return boxes[order], scores[order]

    @staticmethod
    def _d2_order(boxes, scores, height, width, scale, topk):
        order = torch.sort(scores, descending=True, stable=True).indices[:topk]
        boxes = box_coder.clip(boxes[order], height, width, plus_one=False)
        scores = scores[order]
        widths, heights = box_coder.box_sides(boxes, plus_one=False)
        keep = (widths > 0) & (heights > 0)
        return boxes[keep], scores[keep]
