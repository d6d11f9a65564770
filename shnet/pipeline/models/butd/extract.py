"""One batch of prepared images -> each image's regions: features, boxes in original pixels, object
and attribute predictions, chosen by the configured selection (or the given boxes, pooled as given).

The detector sees one image at a time, as the published extractors run it: a padded batch would
change an image's regions with its batch-mates (zero padding is not neutral), and even a batch of
same-size images changes them in the last bits (a convolution over N images or a linear layer over
more rows sums in another order). Alone, an image gives the same bits in any batch; on a CPU the
per-image calls cost no measurable throughput (the res5 head, most of the work, already runs
hundreds of proposals per call)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .detector import BUTDDetector
from .preprocess import PreparedImage
from .selection import caffe_keep, d2_detections, max_class_confidence


@dataclass(frozen=True)
class SelectionOptions:
    selection: str  # "caffe" | "d2"
    min_boxes: int
    max_boxes: int
    conf_threshold: float
    nms_iou: float
    pre_nms_topk: int
    post_nms_topk: int
    rpn_nms_iou: float


@dataclass
class ImageRegions:
    features: np.ndarray  # [n, 2048] float32
    boxes: np.ndarray  # [n, 4] float32, original pixels
    object_class: np.ndarray  # [n] index into the 1600 VG objects
    object_score: np.ndarray
    attr_class: np.ndarray  # [n] index into the 400 VG attributes
    attr_score: np.ndarray


def extract_regions(model: BUTDDetector, prepared: list[PreparedImage], options: SelectionOptions, autocast) -> list[ImageRegions]:
    """Each image's regions, in the order of ``prepared``."""
    return [_extract_one(model, image, options, autocast) for image in prepared]


def _extract_one(model: BUTDDetector, image: PreparedImage, options: SelectionOptions, autocast) -> ImageRegions:
    with torch.inference_mode():
        with autocast:
            features = model.features(model.batch([image]))
            if image.given_boxes is not None:
                boxes = [image.to_resized(torch.as_tensor(image.given_boxes, dtype=torch.float32, device=model.device))]
            else:
                boxes = model.proposals(features, [image], options.pre_nms_topk, options.post_nms_topk, options.rpn_nms_iou)
            prediction = model.predict(features, boxes, [image])[0]
        if image.given_boxes is not None:
            return _given(prediction, image)
        choose = _caffe if options.selection == "caffe" else _d2
        return choose(prediction, boxes[0], image, options)


def _regions(pred, index, boxes, object_class, object_score) -> ImageRegions:
    attr_score, attr_class = pred.attr_probs[index].max(dim=1)
    return ImageRegions(
        pred.features[index].cpu().numpy(),
        boxes.float().cpu().numpy(),
        object_class.cpu().numpy(),
        object_score.cpu().numpy(),
        attr_class.cpu().numpy(),
        attr_score.cpu().numpy(),
    )


def _caffe(pred, proposals, image: PreparedImage, options: SelectionOptions) -> ImageRegions:
    """Boxes = the kept proposals in original pixels; NMS on those with Caffe's pixel-inclusive
    overlap, as the extractor does whichever checkpoint produced the proposals."""
    original = image.to_original(proposals.float())
    max_conf = max_class_confidence(original, pred.object_probs, options.nms_iou, plus_one=True)
    keep = caffe_keep(max_conf, options.conf_threshold, options.min_boxes, options.max_boxes)
    object_score, object_class = pred.object_probs[keep].max(dim=1)
    return _regions(pred, keep, original[keep], object_class, object_score)


def _d2(pred, proposals, image: PreparedImage, options: SelectionOptions) -> ImageRegions:
    """Boxes = the detections' regressed boxes in original pixels; detectron2's NMS (no +1), whichever
    checkpoint produced them."""
    found = d2_detections(pred.class_boxes, pred.object_probs, options.conf_threshold, options.max_boxes, options.nms_iou, plus_one=False)
    return _regions(pred, found.proposal, image.to_original(found.boxes), found.classes, found.scores)


def _given(pred, image: PreparedImage) -> ImageRegions:
    index = torch.arange(len(image.given_boxes), device=pred.features.device)
    object_score, object_class = pred.object_probs.max(dim=1)
    return _regions(pred, index, torch.as_tensor(image.given_boxes, dtype=torch.float32), object_class, object_score)
