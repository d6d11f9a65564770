"""What a user chooses of a demo run (torch-free, so that ``shnet demo --help`` starts fast)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_IMAGES = 300
DEFAULT_EPOCHS = 2


@dataclass
class DemoOptions:
    output: str = "shnet-demo"
    images: int = DEFAULT_IMAGES
    epochs: int = DEFAULT_EPOCHS
    seed: int = 0
    workers: int | None = None  # extraction workers (default: the embedded cluster's)
    progress: bool = True
