"""Device placement and mixed precision for stage models."""

from __future__ import annotations

import contextlib

import torch

from ...errors import ShnetError


def to_device(model: torch.nn.Module, device: str) -> torch.nn.Module:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ShnetError("--device cuda was asked for but this worker has no usable CUDA device")
        model = model.to(device).to(memory_format=torch.channels_last)
    return model.eval()


def autocast_for(device: str):
    """fp16 autocast on CUDA (features are stored as fp16 anyway); exact fp32 on CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
