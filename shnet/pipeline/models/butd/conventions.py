"""The numerics of the two published conversions of the Caffe bottom-up-attention model.

``caffe``: MILVLG bottom-up-attention.pytorch (``bua-caffe-frcn-r101_with_attributes.pth``): a 2-way
softmax objectness per anchor (24 channels: 12 background then 12 object), anchors from detectron2's
generator with the sizes its config gives (4, 8, 16, 32: the Caffe scales, read as pixels by that
generator; the converted RPN weights are those of that code), pixel-inclusive box arithmetic (width = x2 - x1 + 1, clipping to size - 1), background as class 0 and
"no attribute" as attribute 0, box regression weights (1, 1, 1, 1).

``d2``: airsplay py-bottom-up-attention (``faster_rcnn_from_caffe_attr.pkl``): detectron2's sigmoid
objectness (12 channels), anchors of 64, 128, 256, 512 pixels, box arithmetic without the +1, background as the
last class, "no attribute" as the last attribute, ROI box regression weights (10, 10, 5, 5).

Which one a checkpoint follows is read from its objectness layer (24 vs 12 output channels).
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_OBJECTS = 1600
NUM_ATTRIBUTES = 400
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
ANCHORS_PER_POSITION = 12


@dataclass(frozen=True)
class Convention:
    name: str
    softmax_objectness: bool
    plus_one: bool
    background_first: bool
    roi_box_weights: tuple[float, float, float, float]
    anchor_sizes: tuple[int, ...]
    rpn_box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    @property
    def objectness_channels(self) -> int:
        return ANCHORS_PER_POSITION * (2 if self.softmax_objectness else 1)

    @property
    def box_classes(self) -> int:
        """Classes with their own box regression: all 1601 (background included) in Caffe's layout."""
        return NUM_OBJECTS + 1 if self.background_first else NUM_OBJECTS


CAFFE = Convention("caffe", softmax_objectness=True, plus_one=True, background_first=True, roi_box_weights=(1.0, 1.0, 1.0, 1.0), anchor_sizes=(4, 8, 16, 32))
D2 = Convention("d2", softmax_objectness=False, plus_one=False, background_first=False, roi_box_weights=(10.0, 10.0, 5.0, 5.0), anchor_sizes=(64, 128, 256, 512))
CONVENTIONS = {c.name: c for c in (CAFFE, D2)}
