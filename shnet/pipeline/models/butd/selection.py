"""Which proposals become an image's regions.

``caffe`` (the default; Caffe ``generate_tsv.py`` and MILVLG's extractor, whose features SCAN,
VSE-infinity and 3SHNet were trained on): per object class, NMS at ``nms_iou`` over the *proposal*
boxes with that class's probabilities; ``max_conf`` of a proposal is its best class probability
among the classes whose NMS kept it. Proposals with ``max_conf >= conf_threshold`` are kept (in
proposal order); fewer than ``min_boxes``: the ``min_boxes`` best; more than ``max_boxes``: the
``max_boxes`` best (by decreasing ``max_conf``). A fixed K is ``min_boxes = max_boxes = K``.

``d2`` (py-bottom-up-attention's demo): detectron2's per-class inference over the *regressed*
boxes (score > threshold, per-class NMS), the NMS threshold raised from 0.5 in steps of 0.1 until
exactly K detections remain; the regions are the proposals those detections came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import box_coder

D2_NMS_STEP = 0.1


def max_class_confidence(boxes: torch.Tensor, class_scores: torch.Tensor, nms_iou: float, plus_one: bool) -> torch.Tensor:
    """``max_conf`` [R] of proposals ``boxes`` [R,4] with object probabilities ``class_scores`` [R,C].

    The same as running greedy NMS once per class, for all classes at once: the overlap matrix does
    not depend on the class, so the greedy pass walks every class's score order together.
    """
    num_boxes, num_classes = class_scores.shape
    if num_boxes == 0:
        return class_scores.new_zeros(0)
    overlaps = box_coder.overlapping(boxes, nms_iou, plus_one)
    order = torch.sort(class_scores, dim=0, descending=True, stable=True).indices  # [R, C]
    classes = torch.arange(num_classes, device=class_scores.device)
    suppressed = torch.zeros(num_classes, num_boxes, dtype=torch.bool, device=class_scores.device)
    kept = torch.zeros_like(suppressed)
    for rank in range(num_boxes):
        candidate = order[rank]
        alive = ~suppressed[classes, candidate]
        kept[classes, candidate] = alive
        suppressed |= overlaps[candidate] & alive[:, None]
    kept_scores = torch.where(kept.T, class_scores, torch.zeros_like(class_scores))
    return kept_scores.max(dim=1).values


def caffe_keep(max_conf: torch.Tensor, conf_threshold: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """Indices of the kept proposals, in the order the extractor writes them."""
    keep = torch.nonzero(max_conf >= conf_threshold).flatten()
    if len(keep) < min_boxes:
        return torch.sort(max_conf, descending=True, stable=True).indices[:min_boxes]
    if len(keep) > max_boxes:
        return torch.sort(max_conf, descending=True, stable=True).indices[:max_boxes]
    return keep


@dataclass
class Detections:
    """Per-class detections of one image: source proposal index, box, class, score (best first)."""

    proposal: torch.Tensor
    boxes: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor


def per_class_detections(
    class_boxes: torch.Tensor, class_scores: torch.Tensor, score_threshold: float, nms_iou: float, topk: int, plus_one: bool
) -> Detections:
    """detectron2's ``fast_rcnn_inference_single_image``: ``class_boxes`` [R,C,4] (already clipped),
    ``class_scores`` [R,C]; keep score > threshold, NMS per class, the ``topk`` best."""
    mask = class_scores > score_threshold
    index = mask.nonzero()
    boxes = class_boxes[mask]
    scores = class_scores[mask]
    keep = box_coder.batched_nms(boxes, scores, index[:, 1], nms_iou, plus_one)[:topk]
    return Detections(index[keep, 0], boxes[keep], index[keep, 1], scores[keep])


def d2_detections(
    class_boxes: torch.Tensor, class_scores: torch.Tensor, score_threshold: float, num_boxes: int, first_nms_iou: float, plus_one: bool
) -> Detections:
    """py-bottom-up-attention's loop: raise the NMS threshold from ``first_nms_iou`` (0.5 there) in
    steps of 0.1 below 1 until exactly ``num_boxes`` remain; the last try's detections otherwise."""
    for threshold in np.arange(first_nms_iou, 1.0, D2_NMS_STEP):
        found = per_class_detections(class_boxes, class_scores, score_threshold, float(threshold), num_boxes, plus_one)
        if len(found.proposal) == num_boxes:
            break
    return found
