"""The settings of a training run and the choices the trainer's options take.

Torch-free, so that the command line (``shnet train --help``, option choices and defaults) loads
without torch; the modules that build models import these names from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ShnetError

LEVELS = ("region", "grid")
TEXT_ENCODERS = ("bigru", "bert")
SEG_MAP_MODES = ("raw", "normalised")

# Options that describe where and how fast a run executes, not what it computes (``caches``: where
# the features lie): a resumed run may change these; every other option is the run's recipe.
# ``world_size`` is not an option but the number of training processes the launcher started.
RUNTIME_OPTIONS = ("output", "caches", "epochs", "workers", "in_memory", "device", "progress", "world_size")


@dataclass
class TrainOptions:
    """Every setting of a run; the defaults are the paper's recipe (see reference/3shnet-region-model.md)."""

    caches: list[str]
    captions: str | None  # None: the captions a cache holds (an imported cache)
    output: str
    level: str = "region"
    text_encoder: str = "bigru"
    bert_path: str | None = None
    embed_size: int = 1024
    word_dim: int = 300
    seg_map_mode: str = "raw"
    epochs: int = 25
    batch_size: int = 256
    lr: float = 5e-4
    bert_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    lr_update: int = 15
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    margin: float = 0.2
    max_violation_after: int = 1
    region_dropout: float = 0.2
    train_split: str = "train"
    val_split: str = "val"
    val_images: int = 1000
    seed: int = 0
    workers: int = 2
    in_memory: bool = False
    device: str = "auto"
    progress: bool = True
    world_size: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShnetError(f"unknown training options {unknown}; was this run written by a newer shnet?")
        return cls(**d)

    def check(self) -> None:
        positive = ("epochs", "batch_size", "embed_size", "word_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ShnetError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.batch_size < 2:
            raise ShnetError("--batch-size must be at least 2 (the loss needs negatives in the batch)")
        if self.workers < 0:
            raise ShnetError(f"--workers must be 0 (load in the training process) or more (got {self.workers})")
        if not 0 <= self.region_dropout < 1:
            raise ShnetError(f"--region-dropout must lie in [0, 1) (got {self.region_dropout})")
        if self.text_encoder == "bert" and not self.bert_path:
            raise ShnetError("--text-encoder bert needs --bert-path: a local bert-base-uncased folder")
        if self.text_encoder == "bert":
            from .text_encoders import check_bert_folder

            check_bert_folder(self.bert_path)
        from ..cache import Cache

        for root in self.caches:
            Cache(root)
