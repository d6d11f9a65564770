"""``regions.backend=detectron2``: the same stage run by detectron2 itself, where it is importable.

The bottom-up-attention network needs detectron2's VG modifications (caffe max-pool stem, 512-channel
RPN, dilated res5, attribute head): py-bottom-up-attention's detectron2 has them, behind the config
keys ``MODEL.CAFFE_MAXPOOL``, ``MODEL.PROPOSAL_GENERATOR.HID_CHANNELS``, ``MODEL.ROI_BOX_HEAD.RES5HALVE``
/ ``ATTR`` / ``NUM_ATTRS``; a detectron2 without those keys is refused. That network is the ``d2``
convention (py-bottom-up-attention's ``.pkl``). Weights are read with shnet's own loaders (never
detectron2's pickle loading) and matched strictly by name.

:class:`Detectron2Detector` offers the interface :func:`.extract.extract_regions` uses, so the box
selection and the stored arrays are the native backend's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ....errors import ShnetError
from . import box_coder
from .weights import RANDOM_WEIGHTS, read_detector_state
from .conventions import D2, NUM_ATTRIBUTES, NUM_OBJECTS
from .detector import BoxPredictions
from .preprocess import PIXEL_MEANS_BGR, PreparedImage

VG_KEYS = ("CAFFE_MAXPOOL",)


def detectron2_config(depth: int, pre_nms_topk: int, post_nms_topk: int, rpn_nms_iou: float, device: str):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    if not all(hasattr(cfg.MODEL, key) for key in VG_KEYS) or not hasattr(cfg.MODEL.ROI_BOX_HEAD, "ATTR"):
        raise ShnetError(
            "regions.backend=detectron2: this detectron2 lacks the Visual Genome modifications of the "
            "bottom-up-attention model (MODEL.CAFFE_MAXPOOL, ROI_BOX_HEAD.ATTR): install py-bottom-up-attention's "
            "detectron2, or use regions.backend=native"
        )
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.DEVICE = "cuda" if device.startswith("cuda") else "cpu"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.CAFFE_MAXPOOL = True
    cfg.MODEL.PIXEL_MEAN = list(PIXEL_MEANS_BGR)
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    cfg.MODEL.PROPOSAL_GENERATOR.HID_CHANNELS = 512
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(D2.anchor_sizes)]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = pre_nms_topk
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = post_nms_topk
    cfg.MODEL.RPN.NMS_THRESH = rpn_nms_iou
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_OBJECTS
    cfg.MODEL.ROI_BOX_HEAD.RES5HALVE = False
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    cfg.MODEL.ROI_BOX_HEAD.ATTR = True
    cfg.MODEL.ROI_BOX_HEAD.NUM_ATTRS = NUM_ATTRIBUTES
    return cfg


class Detectron2Detector:
    convention = D2

    def __init__(self, weights: str, depth: int, pre_nms_topk: int, post_nms_topk: int, rpn_nms_iou: float, device: str, allow_missing_keys: bool):
        from detectron2.modeling import build_model

        self.model = build_model(detectron2_config(depth, pre_nms_topk, post_nms_topk, rpn_nms_iou, device)).eval()
        if weights != RANDOM_WEIGHTS:
            self.model.load_state_dict(read_detector_state(weights), strict=not allow_missing_keys)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def batch(self, prepared: list[PreparedImage]):
        """detectron2's own normalisation (the images go back to pixel values first); its padding adds
        nothing: :func:`.extract.extract_regions` hands over one image at a time."""
        means = np.asarray(PIXEL_MEANS_BGR, np.float32)[:, None, None]
        return self.model.preprocess_image([{"image": torch.from_numpy(p.image + means)} for p in prepared])

    def features(self, images):
        return images, self.model.backbone(images.tensor)

    def proposals(self, features, prepared, pre_nms_topk, post_nms_topk, nms_iou) -> list[torch.Tensor]:
        images, maps = features
        found, _ = self.model.proposal_generator(images, maps, None)
        return [p.proposal_boxes.tensor for p in found]

    def predict(self, features, boxes: list[torch.Tensor], prepared: list[PreparedImage]) -> list[BoxPredictions]:
        from detectron2.structures import Boxes

        _, maps = features
        heads = self.model.roi_heads
        pooled = heads._shared_roi_transform([maps[f] for f in heads.in_features], [Boxes(b) for b in boxes]).mean(dim=(2, 3))
        class_logits, attr_logits, deltas = heads.box_predictor(pooled)
        object_probs = F.softmax(class_logits.float(), dim=1)[:, :-1]
        attr_probs = F.softmax(attr_logits.float()[:, :-1], dim=1)
        class_boxes = heads.box2box_transform.apply_deltas(deltas.float(), torch.cat(boxes).float()).view(len(pooled), -1, 4)
        counts = [len(b) for b in boxes]
        out = []
        for i, part in enumerate(zip(*(t.split(counts) for t in (pooled.float(), object_probs, class_boxes, attr_probs)))):
            height, width = prepared[i].resized_hw
            feats, objs, cboxes, attrs = part
            out.append(BoxPredictions(feats, objs, box_coder.clip(cboxes, height, width, plus_one=False), attrs))
        return out
