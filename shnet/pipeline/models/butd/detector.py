"""The assembled detector. Its input is :mod:`.preprocess`'s, never padded: zero padding is not
neutral (after conv1 + BN + ReLU the padded area is non-zero), so a padded image's features,
proposals and boxes near its right and bottom edges would depend on its batch-mates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import box_coder
from .backbone import ResNetC4
from .conventions import Convention
from .preprocess import PreparedImage
from .roi_heads import Res5ROIHeads
from .rpn import RPN


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
        """Images of one resized size stacked, never padded."""
        sizes = {p.resized_hw for p in prepared}
        if len(sizes) != 1:
            raise ValueError(f"a detector batch holds images of one size, got {sorted(sizes)}")
        return torch.stack([torch.from_numpy(p.image) for p in prepared]).to(self.device, non_blocking=True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def proposals(self, features: torch.Tensor, prepared: list[PreparedImage], pre_nms_topk: int, post_nms_topk: int, nms_iou: float) -> list[torch.Tensor]:
        return self.proposal_generator(
            features, [p.resized_hw for p in prepared], [p.scale for p in prepared], pre_nms_topk, post_nms_topk, nms_iou
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
