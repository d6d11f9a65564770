"""shnet: image folders to a trained 3SHNet image-sentence retrieval model."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ensure_torchvision imports torch: loaded on first use, so that `import shnet` stays light
    if name == "ensure_torchvision":
        from .torchvision_compat import ensure_torchvision

        return ensure_torchvision
    raise AttributeError(f"module 'shnet' has no attribute {name!r}")


__all__ = ["__version__", "ensure_torchvision"]
