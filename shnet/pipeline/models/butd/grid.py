"""The detector's trunk as a grid-feature backbone (grid-feats-vqa / VSE-infinity "BUTD grid"): the
caffe ResNet up to res4 and the VG res5 (stride 1, dilation 2) over the whole image, so the grid has
stride 16 and 2048 channels. Parameter names are the detector's (``backbone.*``, ``roi_heads.res5.*``),
so the same checkpoint file loads; its RPN and box predictor are not used.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import ResNetC4, visual_genome_res5
from .weights import read_detector_state
from .preprocess import PIXEL_MEANS_BGR

TRUNK_PREFIXES = ("backbone.", "roi_heads.res5.")
#: the grid stage normalises RGB pixels as (x / 255 - mean) / std: these make it x - caffe mean
RGB_MEAN = tuple(m / 255.0 for m in reversed(PIXEL_MEANS_BGR))
RGB_STD = (1 / 255.0,) * 3


class _Res5Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.res5 = visual_genome_res5()


class DetectorTrunk(nn.Module):
    stride = 16
    channels = 2048

    def __init__(self, depth: int):
        super().__init__()
        self.backbone = ResNetC4(depth)
        self.roi_heads = _Res5Holder()

    def forward_features(self, rgb_minus_means: torch.Tensor) -> torch.Tensor:
        """The caffe model reads BGR: the channels are flipped here, after the grid preprocessing."""
        return self.roi_heads.res5(self.backbone(rgb_minus_means.flip(1)))


def trunk_state(weights) -> dict[str, torch.Tensor]:
    """The trunk's entries of a detector checkpoint (either published naming); frozen-BN entries
    without statistics get 0 and 1, as in the detector."""
    state = {k: v for k, v in read_detector_state(weights).items() if k.startswith(TRUNK_PREFIXES)}
    for key in [k for k in state if k.endswith(".norm.weight")]:
        state.setdefault(key.replace(".weight", ".running_mean"), torch.zeros_like(state[key]))
        state.setdefault(key.replace(".weight", ".running_var"), torch.ones_like(state[key]))
    return state
