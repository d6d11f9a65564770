"""The training half of shnet: cached features -> trained 3SHNet retrieval model -> metrics.

The public names load on first use, so that importing a torch-free part of the trainer (its
options, captions or metrics) does not import torch.
"""

from importlib import import_module

_PUBLIC = {
    "LoadedModel": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ModelConfig": "model",
    "SHNet": "model",
    "build_model": "model",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'shnet.trainer' has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
