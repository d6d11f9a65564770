"""The assembled detector and its input: BGR, caffe pixel means, no std scaling, shortest side
``min_size`` and longest at most ``max_size`` (cv2 bilinear, one scale for both axes), padded
bottom-right to a common size for a batch."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import box_coder
from .backbone import ResNetC4, res4_size
from .conventions import Convention
from .roi_heads import Res5ROIHeads
from .rpn import RPN

PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)


@dataclass
class PreparedImage:
    image: np.ndarray  # [3, h, w] float32, BGR minus the pixel means
    scale: float  # resized / original
    original_hw: tuple[int, int]
    given_boxes: np.ndarray | None = None  # [G, 4] in original pixels (regions.boxes mode)

    @property
    def resized_hw(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[2]


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The extractors' scale: shortest side to ``min_size`` unless the longest would pass ``max_size``."""
    scale = float(min_size) / min(height, width)
    if np.round(scale * max(height, width)) > max_size:
        scale = float(max_size) / max(height, width)
    return scale


def preprocess(rgb: np.ndarray, min_size: int, max_size: int) -> PreparedImage:
    """An RGB uint8 image [H,W,3] as the Caffe extractor feeds it (means subtracted, then resized)."""
    height, width = rgb.shape[:2]
    bgr = rgb[:, :, ::-1].astype(np.float32) - np.asarray(PIXEL_MEANS_BGR, np.float32)
    scale = resize_scale(height, width, min_size, max_size)
    resized = cv2.resize(bgr, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return PreparedImage(np.ascontiguousarray(resized.transpose(2, 0, 1)), scale, (height, width))


@dataclass
class BoxPredictions:
    """Per box: pooled feature, object probabilities [R,1600], class boxes [R,1600,4] (resized-image
    coordinates, clipped), attribute probabilities [R,400]; background / "no attribute" removed."""

    features: torch.Tensor
    object_probs: torch.Tensor
    class_boxes: torch.Tensor
    attr_probs: torch.Tensor


class BUTDDetector(nn.Module):
    """Parameter names as detectron2's GeneralizedRCNN: ``backbone``, ``proposal_generator``, ``roi_heads``."""

    def __init__(self, depth: int, convention: Convention):
        super().__init__()
        self.depth = depth
        self.convention = convention
        self.backbone = ResNetC4(depth)
        self.proposal_generator = RPN(ResNetC4.channels, ResNetC4.stride, convention)
        self.roi_heads = Res5ROIHeads(convention, ResNetC4.stride)

    @property
    def device(self) -> torch.device:
        return self.backbone.stem.conv1.weight.device

    def batch(self, prepared: list[PreparedImage]) -> torch.Tensor:
        """Images padded with zeros (the pixel mean) to the largest height and width of the batch."""
        height = max(p.resized_hw[0] for p in prepared)
        width = max(p.resized_hw[1] for p in prepared)
        images = [F.pad(torch.from_numpy(p.image), (0, width - p.resized_hw[1], 0, height - p.resized_hw[0])) for p in prepared]
        return torch.stack(images).to(self.device, non_blocking=True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def proposals(self, features: torch.Tensor, prepared: list[PreparedImage], pre_nms_topk: int, post_nms_topk: int, nms_iou: float) -> list[torch.Tensor]:
        sizes = [p.resized_hw for p in prepared]
        return self.proposal_generator(
            features, sizes, [res4_size(*s) for s in sizes], [p.scale for p in prepared], pre_nms_topk, post_nms_topk, nms_iou
        )

    def predict(self, features: torch.Tensor, boxes: list[torch.Tensor], prepared: list[PreparedImage]) -> list[BoxPredictions]:
        """Every image's boxes through the res5 head and the predictor in one batched call."""
        pooled = self.roi_heads.pooled_features(features, boxes)
        class_logits, deltas, attr_logits = self.roi_heads.box_predictor(pooled)
        pooled, class_logits, deltas, attr_logits = pooled.float(), class_logits.float(), deltas.float(), attr_logits.float()
        probs = F.softmax(class_logits, dim=1)
        plus_one = self.convention.plus_one
        if self.convention.background_first:
            object_probs = probs[:, 1:]
            attr_probs = F.softmax(attr_logits, dim=1)[:, 1:]
        else:
            object_probs = probs[:, :-1]
            attr_probs = F.softmax(attr_logits[:, :-1], dim=1)
        counts = [len(b) for b in boxes]
        class_boxes = box_coder.decode(deltas, torch.cat(boxes).float(), self.convention.roi_box_weights, plus_one)
        class_boxes = class_boxes.view(len(class_boxes), -1, 4)
        if self.convention.background_first:
            class_boxes = class_boxes[:, 1:]
        out = []
        for i, part in enumerate(zip(*(t.split(counts) for t in (pooled, object_probs, class_boxes, attr_probs)))):
            height, width = prepared[i].resized_hw
            feats, objs, cboxes, attrs = part
            out.append(BoxPredictions(feats, objs, box_coder.clip(cboxes, height, width, plus_one), attrs))
        return out
