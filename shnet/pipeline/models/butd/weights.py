"""The detector's weights: its parameter names in the two published namings, strict loading with a
report, and the detector built from a local weights file, matched strictly by name and shape.
(Reading the file itself, whatever its format, is :mod:`shnet.weights`.)

Formats: detectron2 ``.pkl`` (a pickled dict whose ``model`` maps names to numpy arrays, read with
shnet's restricted unpickler), ``.pth`` / ``.safetensors`` state dicts (bare, or under ``model`` /
``state_dict``). Names: detectron2's, with MILVLG's attribute-head names mapped onto
py-bottom-up-attention's. The convention (``caffe`` / ``d2``) and the depth are read from the file.

Frozen-BN entries without ``running_mean`` / ``running_var`` get 0 and 1 (what detectron2 does)
and are reported; BatchNorm ``num_batches_tracked`` counters (MILVLG's res4/res5) are unused.
Missing or unexpected names refuse the file unless ``allow_missing_keys``, which leaves missing
parameters randomly initialised and reports both lists.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ....errors import CheckpointMismatchError, ShnetError
from ....weights import mismatch_report, read_state_dict
from .backbone import BLOCKS_PER_STAGE
from .conventions import CONVENTIONS, CAFFE, Convention
from .detector import BUTDDetector

RANDOM_WEIGHTS = "random"
RANDOM_SEED = 0
OBJECTNESS_KEY = "proposal_generator.rpn_head.objectness_logits.weight"
#: MILVLG bottom-up-attention.pytorch names -> detectron2 / py-bottom-up-attention names
MILVLG_NAMES = {
    "roi_heads.box_predictor.cls_embed.": "roi_heads.box_predictor.cls_embedding.",
    "roi_heads.box_predictor.attr_linear1.": "roi_heads.box_predictor.fc_attr.",
    "roi_heads.box_predictor.attr_linear2.": "roi_heads.box_predictor.attr_score.",
}
UNUSED_SUFFIXES = (".num_batches_tracked",)


@dataclass
class LoadReport:
    """What loading did beyond a clean one-to-one match, for the summary and the shard attributes."""

    source: str
    convention: str
    depth: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bn_stats_defaulted: int = 0

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} parameter(s) missing from {self.source} left randomly initialised: {', '.join(self.missing[:5])}{' ...' if len(self.missing) > 5 else ''}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} entr(ies) of {self.source} not used: {', '.join(self.unexpected[:5])}{' ...' if len(self.unexpected) > 5 else ''}")
        return out


def normalise_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detectron2 names for both published checkpoints; unused BatchNorm counters dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith(UNUSED_SUFFIXES):
            continue
        for old, new in MILVLG_NAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out


def convention_of(state: dict[str, torch.Tensor], source: str) -> Convention:
    weight = state.get(OBJECTNESS_KEY)
    if weight is None:
        raise CheckpointMismatchError(f"{source} has no {OBJECTNESS_KEY}: not a bottom-up-attention (detectron2-named) Faster R-CNN checkpoint")
    for convention in CONVENTIONS.values():
        if weight.shape[0] == convention.objectness_channels:
            return convention
    raise CheckpointMismatchError(
        f"{source}: {OBJECTNESS_KEY} has {weight.shape[0]} output channels; the bottom-up-attention RPN has 12 "
        "(sigmoid, py-bottom-up-attention) or 24 (softmax, bottom-up-attention.pytorch)"
    )


def depth_of(state: dict[str, torch.Tensor], fallback: int) -> int:
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("backbone.res4.")}
    for depth, counts in BLOCKS_PER_STAGE.items():
        if blocks and max(blocks) + 1 == counts[2]:
            return depth
    return fallback


def _default_bn_stats(model: BUTDDetector, state: dict[str, torch.Tensor]) -> int:
    """Add running_mean 0 / running_var 1 where a frozen BN has its affine terms but no statistics."""
    expected = model.state_dict()
    defaulted = 0
    for key in list(expected):
        if key.endswith(".norm.running_mean") and key not in state and key.replace("running_mean", "weight") in state:
            state[key] = torch.zeros_like(expected[key], device="cpu")
            state[key.replace("running_mean", "running_var")] = torch.ones_like(expected[key], device="cpu")
            defaulted += 1
    return defaulted


def match_state(model: BUTDDetector, state: dict[str, torch.Tensor], source: str, allow_missing_keys: bool) -> LoadReport:
    """Check ``state`` against ``model`` (which may live on the meta device); raise with the named
    report, or return what ``allow_missing_keys`` let through."""
    report = LoadReport(source, model.convention.name, model.depth, bn_stats_defaulted=_default_bn_stats(model, state))
    expected = model.state_dict()
    report.missing = [k for k in expected if k not in state]
    report.unexpected = [k for k in state if k not in expected]
    shapes = {k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)}
    if shapes or ((report.missing or report.unexpected) and not allow_missing_keys):
        lines = mismatch_report(expected, state)
        hint = "" if shapes else "\n(--set regions.allow_missing_keys=true runs anyway, leaving the missing parameters randomly initialised)"
        raise CheckpointMismatchError(f"{source} does not match the bottom-up-attention detector:\n" + "\n".join(lines) + hint)
    return report


def read_detector_state(path: str | Path) -> dict[str, torch.Tensor]:
    return normalise_names(read_state_dict(path))


def detector_for_state(state: dict[str, torch.Tensor], source: str, depth: int, device=None) -> BUTDDetector:
    convention = convention_of(state, source)
    found_depth = depth_of(state, depth)
    if found_depth != depth:
        raise ShnetError(f"{source} holds a ResNet-{found_depth} detector: set regions.depth={found_depth}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return BUTDDetector(depth, convention)


def check_detector_weights(weights: str, depth: int, allow_missing_keys: bool) -> LoadReport | None:
    """Read the file once and match it against a detector built on the meta device (no memory)."""
    if weights == RANDOM_WEIGHTS:
        return None
    state = read_detector_state(weights)
    model = detector_for_state(state, str(weights), depth, device="meta")
    return match_state(model, state, str(weights), allow_missing_keys)


def build_detector(weights: str, depth: int, allow_missing_keys: bool, random_convention: Convention = CAFFE) -> tuple[BUTDDetector, LoadReport | None]:
    """The detector in eval mode with ``weights`` (a local file, or ``"random"``: seeded random init)."""
    if weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return BUTDDetector(depth, random_convention).eval(), None
    state = read_detector_state(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = detector_for_state(state, str(weights), depth)
    return model.eval(), load_state(model, state, str(weights), allow_missing_keys)


def load_state(model: BUTDDetector, state: dict[str, torch.Tensor], source: str, allow_missing_keys: bool) -> LoadReport:
    """Copy ``state`` into ``model`` after :func:`match_state`; returns its report."""
    report = match_state(model, state, source, allow_missing_keys)
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items() if k in expected}, strict=False)
    return report
