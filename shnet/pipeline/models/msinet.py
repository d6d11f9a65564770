"""MSI-Net: the contextual encoder-decoder saliency network of Kroner et al. (Neural Networks 2020).

Architecture (as the reference TensorFlow code, github.com/alexanderkroner/saliency, defines it):

- Encoder: the 13 convolutions of VGG-16 (3x3, ReLU). Pools 1-3 halve the resolution; pools 4
  and 5 are 2x2 with stride 1 (TF "same" padding, i.e. one extra row/column bottom/right), and the
  conv5 block is dilated at rate 2 to make up for the omitted downsampling. The outputs of pools 3,
  4 and 5 (256 + 512 + 512 channels, all at 1/8 resolution) are concatenated: 1280 channels.
- Context module (ASPP): in parallel a 1x1 convolution, 3x3 convolutions at dilation 4, 8 and 12,
  and a global-average-pooled branch (1x1 convolution, broadcast back over the map), each 256
  channels with ReLU; concatenated (1280) and fused by a 1x1 convolution to 256 channels.
- Decoder: three blocks of bilinear 2x upsampling + 3x3 convolution with ReLU (128, 64, 32
  channels), then a 3x3 convolution to one channel without activation, back at input resolution.
- Output: each map is min-max normalised to [0,1]: ``(x - min) / (max(x - min) + 1e-7)``.

Input (what the weights expect): RGB pixel values in [0,255] from which the model itself subtracts
``input_mean`` and divides by ``input_std``, two buffers saved with the weights. The reference
checkpoints subtract (103.939, 116.779, 123.68) from (R, G, B) -- the Caffe BGR means applied to
RGB input, exactly as the reference code does -- and divide by 1. Images are resized keeping their
aspect ratio to fit 240x320 (the SALICON size of the paper; other sizes must be multiples of 8),
with area interpolation when shrinking and bicubic when enlarging, then centred and padded with
the pixel value 126 (:func:`preprocess`); :func:`restore_map` undoes that on the saliency map.

Weights: :func:`load_msinet` reads a shnet-format state dict (the parameter names of
:class:`MSINet`), loaded strictly. A reference TensorFlow checkpoint converts to one with
:func:`convert_reference_variables`, given its variables by name as arrays (from
``tf.train.load_checkpoint(path).get_tensor(name)``, or the same-named constants of a frozen
graph): ``conv{b}/conv{b}_{i}`` -> ``encoder.conv{b}_{i}``, ``aspp/conv1_1``..``aspp/conv1_5`` ->
``context.conv_1x1``, ``context.conv_rate4``, ``context.conv_rate8``, ``context.conv_rate12``,
``context.conv_image_pool``, ``aspp/conv2`` -> ``context.project``, ``decoder/conv1``..``conv3`` ->
``decoder.conv1``..``conv3``, ``decoder/conv4`` -> ``decoder.output``; each ``kernel``
``[kh, kw, in, out]`` becomes ``weight`` ``[out, in, kh, kw]`` and ``bias`` stays ``bias``.
:meth:`MSINet.from_vgg16` starts training instead from a torchvision ``vgg16`` state dict (encoder
only, with torchvision's input statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointMismatchError, ShnetError
from ...weights import load_state_strict, mismatch_report, read_state_dict

INPUT_SIZE = (240, 320)
PAD_VALUE = 126.0
DOWNSAMPLING = 8
REFERENCE_MEAN = (103.939, 116.779, 123.68)
REFERENCE_STD = (1.0, 1.0, 1.0)
TORCHVISION_VGG_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_VGG_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
OUTPUT_EPS = 1e-7

# VGG-16 conv blocks: (output channels, number of 3x3 convolutions)
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

REFERENCE_LAYER_NAMES = {
    **{f"conv{b}/conv{b}_{i}": f"encoder.conv{b}_{i}" for b, (_, n) in enumerate(VGG16_BLOCKS, 1) for i in range(1, n + 1)},
    "aspp/conv1_1": "context.conv_1x1",
    "aspp/conv1_2": "context.conv_rate4",
    "aspp/conv1_3": "context.conv_rate8",
    "aspp/conv1_4": "context.conv_rate12",
    "aspp/conv1_5": "context.conv_image_pool",
    "aspp/conv2": "context.project",
    "decoder/conv1": "decoder.conv1",
    "decoder/conv2": "decoder.conv2",
    "decoder/conv3": "decoder.conv3",
    "decoder/conv4": "decoder.output",
}


def _conv(in_channels: int, out_channels: int, kernel: int = 3, dilation: int = 1) -> nn.Conv2d:
    """A convolution with TF "same" padding (symmetric for odd kernels)."""
    return nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation)


def _max_pool_same_stride1(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling at stride 1 with TF "same" padding: one padded row/column, bottom/right."""
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling as TF1 ``resize_bilinear`` computes it (output pixel i samples input
    i/2, no half-pixel centres), the resampling the reference weights were trained with."""
    for dim in (2, 3):
        n = x.shape[dim]
        low = torch.arange(n, device=x.device).repeat_interleave(2)
        high = (low + 1).clamp(max=n - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = 2 * n
        weight = torch.tensor([0.0, 0.5], dtype=x.dtype, device=x.device).repeat(n).view(shape)
        below = x.index_select(dim, low)
        x = below + (x.index_select(dim, high) - below) * weight
    return x


class MSIEncoder(nn.Module):
    """VGG-16 convolutions with pools 4-5 at stride 1 and conv5 dilated; returns pools 3-5 concatenated."""

    out_channels = 256 + 512 + 512

    def __init__(self):
        super().__init__()
        in_channels = 3
        for block, (channels, convs) in enumerate(VGG16_BLOCKS, 1):
            for i in range(1, convs + 1):
                self.add_module(f"conv{block}_{i}", _conv(in_channels, channels, dilation=2 if block == 5 else 1))
                in_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for block, (_, convs) in enumerate(VGG16_BLOCKS, 1):
            for i in range(1, convs + 1):
                x = F.relu(getattr(self, f"conv{block}_{i}")(x))
            x = F.max_pool2d(x, 2, 2) if block <= 3 else _max_pool_same_stride1(x)
            if block >= 3:
                pooled.append(x)
        return torch.cat(pooled, 1)


class ContextModule(nn.Module):
    """ASPP: parallel 1x1, dilated 3x3 (rates 4, 8, 12) and image-pooling branches, fused by 1x1."""

    def __init__(self, in_channels: int = MSIEncoder.out_channels, channels: int = 256):
        super().__init__()
        self.conv_1x1 = _conv(in_channels, channels, kernel=1)
        self.conv_rate4 = _conv(in_channels, channels, dilation=4)
        self.conv_rate8 = _conv(in_channels, channels, dilation=8)
        self.conv_rate12 = _conv(in_channels, channels, dilation=12)
        self.conv_image_pool = _conv(in_channels, channels, kernel=1)
        self.project = _conv(5 * channels, channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image_pool = F.relu(self.conv_image_pool(x.mean((2, 3), keepdim=True))).expand(-1, -1, *x.shape[2:])
        branches = [F.relu(conv(x)) for conv in (self.conv_1x1, self.conv_rate4, self.conv_rate8, self.conv_rate12)]
        return F.relu(self.project(torch.cat([*branches, image_pool], 1)))


class MSIDecoder(nn.Module):
    """Three (2x bilinear upsampling, 3x3 conv + ReLU) blocks, then a 3x3 conv to one channel."""

    def __init__(self, in_channels: int = 256):
        super().__init__()
        self.conv1 = _conv(in_channels, 128)
        self.conv2 = _conv(128, 64)
        self.conv3 = _conv(64, 32)
        self.output = _conv(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(_upsample2x(x)))
        return self.output(x)


class MSINet(nn.Module):
    """RGB pixels ``[B,3,H,W]`` in [0,255] (H, W multiples of 8) -> saliency ``[B,1,H,W]`` in [0,1]."""

    def __init__(self, mean=REFERENCE_MEAN, std=REFERENCE_STD):
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32))
        self.encoder = MSIEncoder()
        self.context = ContextModule()
        self.decoder = MSIDecoder()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)  # tf.layers.conv2d's defaults, as the reference trained
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[2:]
        if height % DOWNSAMPLING or width % DOWNSAMPLING:
            raise ValueError(f"MSINet input must be a multiple of {DOWNSAMPLING} in height and width, got {height}x{width}")
        x = (images - self.input_mean.view(1, 3, 1, 1)) / self.input_std.view(1, 3, 1, 1)
        maps = self.decoder(self.context(self.encoder(x))).float()
        maps = maps - maps.amin((1, 2, 3), keepdim=True)
        return maps / (maps.amax((1, 2, 3), keepdim=True) + OUTPUT_EPS)

    @classmethod
    def from_vgg16(cls, path: str | Path) -> MSINet:
        """An MSI-Net whose encoder is initialised from a torchvision ``vgg16`` state dict
        (``features.N.*``; the classifier is ignored) and which expects torchvision's input
        statistics; context module and decoder are freshly initialised. For training."""
        model = cls(TORCHVISION_VGG_MEAN, TORCHVISION_VGG_STD)
        state = read_state_dict(path)
        names = _vgg16_feature_names()
        encoder_state = model.encoder.state_dict()
        expected = {vgg: encoder_state[ours] for vgg, ours in names.items()}
        loaded = {k: v for k, v in state.items() if k.startswith("features.")}
        report = mismatch_report(expected, loaded)
        if report:
            raise CheckpointMismatchError(f"{path} is not a torchvision vgg16 state dict:\n" + "\n".join(report))
        model.encoder.load_state_dict({ours: loaded[vgg] for vgg, ours in names.items()})
        return model.eval()


def _vgg16_feature_names() -> dict[str, str]:
    """torchvision ``vgg16.features`` parameter names -> :class:`MSIEncoder` names. Each conv in
    ``features`` is followed by a ReLU (two indices per conv) and each block by a max-pool."""
    names = {}
    index = 0
    for block, (_, convs) in enumerate(VGG16_BLOCKS, 1):
        for i in range(1, convs + 1):
            for param in ("weight", "bias"):
                names[f"features.{index}.{param}"] = f"conv{block}_{i}.{param}"
            index += 2
        index += 1
    return names


def check_msinet_weights(weights_path: str | Path) -> None:
    """Read the weights file once and match its names and shapes to MSI-Net (built on the meta
    device: nothing allocated), raising the named mismatch report."""
    with torch.device("meta"):
        expected = MSINet().state_dict()
    report = mismatch_report(expected, read_state_dict(weights_path))
    if report:
        raise CheckpointMismatchError(f"{weights_path} does not match MSINet:\n" + "\n".join(report))


def load_msinet(weights_path: str | Path) -> MSINet:
    """An MSI-Net in eval mode with the shnet-format state dict at ``weights_path`` (strict)."""
    model = MSINet()
    load_state_strict(model, read_state_dict(weights_path), str(weights_path))
    return model.eval()


def convert_reference_variables(variables: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A shnet-format MSI-Net state dict from the variables of a reference TensorFlow checkpoint
    (``conv1/conv1_1/kernel`` ... ``decoder/conv4/bias``), with the reference input statistics."""
    state = {"input_mean": torch.tensor(REFERENCE_MEAN), "input_std": torch.tensor(REFERENCE_STD)}
    missing = []
    for tf_name, ours in REFERENCE_LAYER_NAMES.items():
        for tf_param, param in (("kernel", "weight"), ("bias", "bias")):
            key = f"{tf_name}/{tf_param}"
            if key not in variables:
                missing.append(key)
                continue
            value = torch.from_numpy(np.asarray(variables[key], dtype=np.float32))
            state[f"{ours}.{param}"] = value.permute(3, 2, 0, 1).contiguous() if tf_param == "kernel" else value
    if missing:
        raise ShnetError(f"not an MSI-Net checkpoint: missing variables {', '.join(missing)}")
    return state


class PadBox(NamedTuple):
    """Where the resized image lies inside the padded network input."""

    top: int
    left: int
    height: int
    width: int


def preprocess(rgb_uint8: np.ndarray, size: tuple[int, int] = INPUT_SIZE) -> tuple[np.ndarray, PadBox]:
    """An RGB ``[H,W,3]`` uint8 image -> float32 ``[3, size]`` pixels in [0,255] as the reference
    pipeline prepares them (aspect kept, area/bicubic resampling, centred, padded with 126)."""
    target_h, target_w = size
    if target_h % DOWNSAMPLING or target_w % DOWNSAMPLING:
        raise ShnetError(f"MSI-Net input size must be a multiple of {DOWNSAMPLING} on both sides, got {target_h}x{target_w}")
    height, width = rgb_uint8.shape[:2]
    ratio = min(target_h / height, target_w / width)
    new_h = min(target_h, max(1, round(height * ratio)))
    new_w = min(target_w, max(1, round(width * ratio)))
    shrinking = new_h < height or new_w < width
    resized = cv2.resize(
        rgb_uint8.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    )
    box = PadBox((target_h - new_h) // 2, (target_w - new_w) // 2, new_h, new_w)
    out = np.full((3, target_h, target_w), PAD_VALUE, np.float32)
    out[:, box.top : box.top + new_h, box.left : box.left + new_w] = np.clip(resized, 0.0, 255.0).transpose(2, 0, 1)
    return out, box


def restore_map(saliency: np.ndarray, box: PadBox, out_size: tuple[int, int]) -> np.ndarray:
    """The part of a network-sized saliency map ``[H,W]`` that covers the image, resized to
    ``out_size = (h, w)``: float32 in [0,1]."""
    crop = np.ascontiguousarray(saliency[box.top : box.top + box.height, box.left : box.left + box.width], np.float32)
    out_h, out_w = out_size
    shrinking = out_h <= crop.shape[0] and out_w <= crop.shape[1]
    resized = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)
