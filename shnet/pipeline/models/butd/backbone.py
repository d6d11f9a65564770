"""The caffe-style ResNet of the bottom-up-attention model: stride in the first 1x1 conv of a block,
frozen BatchNorm, and the caffe stem max-pool (3x3, stride 2, no padding, ``ceil_mode``).

Module names follow detectron2 (``stem.conv1``, ``res2.0.conv1.norm``, ``res4.22.shortcut``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BN_EPS = 1e-5


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers (as detectron2's)."""

    def __init__(self, num_features: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by its frozen BatchNorm, named ``<conv>.norm``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, bottleneck: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride=stride) if in_channels != out_channels else None
        self.conv1 = ConvNorm(in_channels, bottleneck, 1, stride=stride)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(bottleneck, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


def make_stage(blocks: int, in_channels: int, bottleneck: int, out_channels: int, first_stride: int, dilation: int = 1) -> nn.Sequential:
    layers = [Bottleneck(in_channels, bottleneck, out_channels, first_stride, dilation)]
    layers += [Bottleneck(out_channels, bottleneck, out_channels, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CaffeStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4(nn.Module):
    """Stem + res2..res4: BGR images ``[B,3,H,W]`` -> res4 features ``[B,1024,H/16,W/16]``."""

    stride = 16
    channels = 1024

    def __init__(self, depth: int):
        super().__init__()
        blocks = BLOCKS_PER_STAGE[depth]
        self.stem = CaffeStem()
        self.res2 = make_stage(blocks[0], 64, 64, 256, first_stride=1)
        self.res3 = make_stage(blocks[1], 256, 128, 512, first_stride=2)
        self.res4 = make_stage(blocks[2], 512, 256, 1024, first_stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(images))))


def visual_genome_res5() -> nn.Sequential:
    """res5 as the VG model has it: first block stride 1, every 3x3 dilated by 2 (14x14 stays 14x14)."""
    return make_stage(3, 1024, 512, 2048, first_stride=1, dilation=2)
