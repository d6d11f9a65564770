"""Read a flat ``name -> tensor`` state dict out of a local weights file, whatever wrapper it came in."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ...checkpoints import load_weights_file, strip_prefix, to_tensor_dict
from ...errors import ShnetError

_WRAPPER_KEYS = ("state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from a ``{"state_dict": ...}`` or ``{"model": ...}``
    training checkpoint and from a ``module.`` (DataParallel) or ``model.`` prefix on every key."""
    obj = load_weights_file(path)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    state = to_tensor_dict(obj) if isinstance(obj, Mapping) else {}
    if not state:
        raise ShnetError(f"{path}: holds no tensors by name; expected a model state dict")
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = strip_prefix(state, prefix)
    return state
