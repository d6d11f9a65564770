"""Grid-feature backbones: the last convolutional stage of a CNN, kept spatial (no pooling).

``model`` names a torchvision ResNet-family architecture (``resnet152``; the ResNeXt-101 32x8d WSL
weights use ``resnext101_32x8d``) or ``timm:<name>`` for any timm model whose ``forward_features``
returns a feature map. ``weights`` is a local state dict in that library's own parameter names
(``.pth``/``.safetensors``/HF folder); classifier-head entries (``fc.*``, ``head.*``,
``classifier.*``, and whatever timm declares as the model's classifier) are ignored and every other
entry must match the architecture exactly.
``weights="random"`` builds a fixed-seed random initialisation: meaningless features, for tests and
smoke runs only.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from torch import nn

from ...errors import CheckpointMismatchError, ShnetError
from ...weights import mismatch_report, read_state_dict
from ..grid_backbones import BUTD_ARCHITECTURES, RANDOM_WEIGHTS, TIMM_PREFIX, check_backbone_name

RANDOM_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_PREFIXES = ("fc.", "head.", "classifier.")
PREPROCESS_MODES = ("stretch", "pad")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to ``layer4``; parameter names stay torchvision's, minus ``fc``."""

    def __init__(self, resnet: torchvision.models.ResNet):
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class GridBackbone(nn.Module):
    """Normalised images ``[B,3,H,W]`` -> grid features ``[B, channels, ceil(H/stride), ceil(W/stride)]``.

    ``mean``/``std`` are the per-channel RGB statistics (on pixels scaled to [0,1]) the weights expect.
    """

    def __init__(self, net: nn.Module, name: str, channels: int, stride: int, mean, std):
        super().__init__()
        self.net = net
        self.name = name
        self.channels = channels
        self.stride = stride
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(images)


def build_grid_backbone(model: str, weights: str | Path | None) -> GridBackbone:
    """The backbone ``model`` with ``weights`` (a local file, or ``"random"``), in eval mode."""
    _require_weights(model, weights)
    state = None if weights == RANDOM_WEIGHTS else _read_weights(model, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        backbone = _architecture(model)
    if state is not None:
        backbone.net.load_state_dict(_matching_entries(backbone.net, state, str(weights), model), strict=False)
    return backbone.eval()


def check_grid_weights(model: str, weights: str | Path | None) -> None:
    """What :func:`build_grid_backbone` would refuse, found without building the model for real:
    the architecture is built on the meta device and the weights file is read once and matched."""
    _require_weights(model, weights)
    with torch.device("meta"):
        backbone = _architecture(model)
    if weights != RANDOM_WEIGHTS:
        _matching_entries(backbone.net, _read_weights(model, weights), str(weights), model)


def _require_weights(model: str, weights) -> None:
    if weights is None:
        raise ShnetError(
            f"grid model {model} needs weights: pass --set grid.weights=/path/to/file.pth "
            f"(a local {model} state dict), or --set grid.weights=random for a random-init smoke run"
        )


def _read_weights(model: str, weights) -> dict[str, torch.Tensor]:
    if model in BUTD_ARCHITECTURES:
        from .butd.grid import trunk_state

        return trunk_state(weights)
    return read_state_dict(weights)


def _architecture(model: str) -> GridBackbone:
    if model in BUTD_ARCHITECTURES:
        from .butd.grid import RGB_MEAN, RGB_STD, DetectorTrunk

        trunk = DetectorTrunk(BUTD_ARCHITECTURES[model])
        return GridBackbone(trunk, model, trunk.channels, trunk.stride, RGB_MEAN, RGB_STD)
    if model.startswith(TIMM_PREFIX):
        return _timm_backbone(model)
    check_backbone_name(model)
    return _torchvision_backbone(model)


def _torchvision_backbone(model: str) -> GridBackbone:
    resnet = getattr(torchvision.models, model)(weights=None)
    return GridBackbone(ResNetTrunk(resnet), model, resnet.fc.in_features, 32, IMAGENET_MEAN, IMAGENET_STD)


def _timm_backbone(model: str) -> GridBackbone:
    import timm  # here, not at the top: timm imports TorchDynamo (1 s per process), torchvision models need neither

    name = model[len(TIMM_PREFIX) :]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ShnetError(f"timm has no model named {name!r}{hint}")
    net = timm.create_model(name, pretrained=False, num_classes=0).eval()
    cfg = net.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[1:]
    with torch.no_grad():
        probe = net.forward_features(torch.zeros(1, 3, *size))
    if probe.ndim != 4:
        raise ShnetError(
            f"{model}: forward_features returns a {tuple(probe.shape)} tensor, not a spatial feature map; "
            "grid features need a convolutional model"
        )
    stride = size[0] // probe.shape[2]
    return GridBackbone(net, model, probe.shape[1], stride, cfg["mean"], cfg["std"])


def _matching_entries(net: nn.Module, state: dict[str, torch.Tensor], source: str, model: str) -> dict[str, torch.Tensor]:
    """The non-head entries of ``state``, after requiring their names and shapes to match ``net``.

    Checkpoints saved before BatchNorm counted its batches lack ``num_batches_tracked``; that
    counter is unused at inference, so its absence is not a mismatch.
    """
    head = _head_prefixes(net)
    loaded = {k: v for k, v in state.items() if not k.startswith(head)}
    expected = {
        k: v
        for k, v in net.state_dict().items()
        if not k.startswith(head) and not (k.endswith("num_batches_tracked") and k not in loaded)
    }
    report = mismatch_report(expected, loaded)
    if report:
        raise CheckpointMismatchError(f"{source} does not match grid model {model}:\n" + "\n".join(report))
    return loaded


def _head_prefixes(net: nn.Module) -> tuple[str, ...]:
    declared = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    declared = (declared,) if isinstance(declared, str) else tuple(declared)
    return HEAD_PREFIXES + tuple(f"{name}." for name in declared)


def preprocess(
    rgb_uint8: np.ndarray, input_size: int, mode: str, mean, std, stride: int = 32
) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB image ``[H,W,3]`` uint8 -> normalised float32 ``[3, input_size, input_size]`` and the
    number of grid rows/columns the image covers.

    ``stretch`` resizes to the square (the whole grid is valid). ``pad`` resizes the longer side to
    ``input_size`` keeping the aspect ratio and puts the image top-left, zeros (the normalised mean)
    filling the bottom/right; the valid grid is ``ceil(resized / stride)`` per axis.
    """
    if mode not in PREPROCESS_MODES:
        raise ShnetError(f"unknown grid preprocess mode {mode!r}: use one of {', '.join(PREPROCESS_MODES)}")
    height, width = rgb_uint8.shape[:2]
    if mode == "stretch":
        new_h = new_w = input_size
    else:
        scale = input_size / max(height, width)
        new_h = min(input_size, max(1, round(height * scale)))
        new_w = min(input_size, max(1, round(width * scale)))
    shrinking = new_h <= height and new_w <= width
    resized = cv2.resize(rgb_uint8, (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    normalised = (resized.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    out = np.zeros((3, input_size, input_size), np.float32)
    out[:, :new_h, :new_w] = normalised.transpose(2, 0, 1)
    return out, (math.ceil(new_h / stride), math.ceil(new_w / stride))
