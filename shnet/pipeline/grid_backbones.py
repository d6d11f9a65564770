"""The grid stage's backbone names and their check, without torch: the extract's own process checks a
config against them before any worker starts, and needs torch only to read a weights file (or to
ask timm about a ``timm:`` name). :mod:`shnet.pipeline.models.grid` builds them."""

from __future__ import annotations

from ..errors import ShnetError

TORCHVISION_ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
TIMM_PREFIX = "timm:"
#: the bottom-up-attention detector's own trunk (backbone + VG res5), loading the detector's checkpoint
BUTD_ARCHITECTURES = {"butd-r101": 101, "butd-r50": 50}
RANDOM_WEIGHTS = "random"


def check_backbone_name(model: str) -> None:
    """Refuse a name that is neither a known architecture nor ``timm:<name>`` (timm's own names are
    checked against timm when the weights are)."""
    if model in TORCHVISION_ARCHITECTURES or model in BUTD_ARCHITECTURES or model.startswith(TIMM_PREFIX):
        return
    raise ShnetError(
        f"unknown grid model {model!r}: use one of {', '.join(TORCHVISION_ARCHITECTURES + tuple(BUTD_ARCHITECTURES))}, "
        f"or timm:<name> for a timm CNN (e.g. timm:resnet152)"
    )


def has_more_than_a_name_to_check(model: str, weights) -> bool:
    """Whether a config's backbone needs more checking than its name: a weights file to read and
    match (or none given), or a timm name to look up. A known architecture with random weights
    needs none."""
    return weights != RANDOM_WEIGHTS or model.startswith(TIMM_PREFIX)
