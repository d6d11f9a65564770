"""The 3SHNet joint embedding model: an image encoder and a text encoder into one l2-normalised space."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..cache.schema import LAYOUT_INPUTS, NUM_CLASSES, REGION_FEATURE_DIM
from ..errors import ShnetError
from .image_encoder import ImageEncoder
from .options import LEVELS, SEG_MAP_MODES, TEXT_ENCODERS
from .text_encoders import (
    BertTextEncoder,
    BiGRUTextEncoder,
    TextEncoder,
    bert_architecture,
    build_bert,
)

IMAGE_INPUTS = ("regions", "lengths", *LAYOUT_INPUTS)  # the batch collate_images makes


@dataclass
class ModelConfig:
    """What it takes to rebuild a model. ``level="grid"`` feeds grid cells where regions go (same
    fusion; ``region_dim`` is then the grid's channel count). ``bert_config`` is the BERT
    architecture (see :func:`~shnet.trainer.text_encoders.bert_architecture`); when set, BERT is
    built from it without pretrained weights (a checkpoint supplies them), else from ``bert_path``."""

    level: str = "region"
    embed_size: int = 1024
    region_dim: int = REGION_FEATURE_DIM
    num_classes: int = NUM_CLASSES
    seg_map_mode: str = "raw"
    text_encoder: str = "bigru"
    bert_path: str | None = None
    vocab_size: int = 0
    word_dim: int = 300
    text_layers: int = 1
    bert_config: dict | None = None

    def __post_init__(self):
        choices = {"level": LEVELS, "seg_map_mode": SEG_MAP_MODES, "text_encoder": TEXT_ENCODERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ShnetError(f"model option {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.embed_size < 2 or self.embed_size % 2:
            raise ShnetError(f"embed_size must be an even number >= 2, got {self.embed_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShnetError(f"unknown model options {unknown} (this shnet knows {sorted(known)}); was it written by a newer shnet?")
        return cls(**d)


class SHNet(nn.Module):
    def __init__(self, img_enc: ImageEncoder, txt_enc: TextEncoder):
        super().__init__()
        self.img_enc = img_enc
        self.txt_enc = txt_enc

    def encode_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch``: regions [B,R,region_dim] (zero padded), lengths [B], seg_map [B,64,64] (class ids),
        cat_onehot [B,C], seg_feat [B,C,7,7] -> l2-normalised [B, D]."""
        missing = [k for k in IMAGE_INPUTS if k not in batch]
        if missing:
            raise ShnetError(f"the image batch lacks {missing} (it needs {list(IMAGE_INPUTS)})")
        return self.img_enc(**{k: batch[k] for k in IMAGE_INPUTS})

    def encode_texts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B,T] padded with 0, ``lengths`` [B] -> l2-normalised [B, D]."""
        return self.txt_enc(tokens, lengths)

    def forward(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor):
        return self.encode_images(batch), self.encode_texts(tokens, lengths)


def build_text_encoder(cfg: ModelConfig) -> TextEncoder:
    """The text side alone (what a search query needs)."""
    if cfg.text_encoder == "bert":
        return BertTextEncoder(build_bert(cfg.bert_config, cfg.bert_path), cfg.embed_size)
    if cfg.vocab_size <= 0:
        raise ShnetError("the BiGRU text encoder needs vocab_size > 0 (set it to the tokenizer's vocab_size)")
    return BiGRUTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_size, cfg.text_layers)


def build_model(cfg: ModelConfig) -> SHNet:
    img_enc = ImageEncoder(cfg.region_dim, cfg.embed_size, cfg.num_classes, cfg.seg_map_mode)
    return SHNet(img_enc, build_text_encoder(cfg))


def config_of(model: SHNet, cfg: ModelConfig) -> ModelConfig:
    """``cfg`` completed with the BERT architecture of ``model`` (so it rebuilds without the folder)."""
    if isinstance(model.txt_enc, BertTextEncoder):
        return dataclasses.replace(cfg, bert_config=bert_architecture(model.txt_enc.bert.config))
    return cfg
