"""The query side of a run: the tokenizer and text encoder a text query needs, nothing of the image side.

A shnet checkpoint's text encoder is built alone and given its ``txt_enc.*`` weights only (strictly:
every key used, every shape equal); the image encoder is never built. A reference checkpoint (the
published 3SHNet files) is loaded whole and its text encoder kept. Either way the run is first checked
to be the file the embeddings came from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ShnetError
from ..fileio import file_sha256

_BATCH = 256


@dataclass
class TextSide:
    encoder: torch.nn.Module  # tokens [B, T], lengths [B] -> l2-normalised [B, D]
    tokenizer: object
    embed_size: int


def verified_checkpoint(record: dict) -> Path:
    """The record's run checkpoint, after checking it is still the file the embeddings came from."""
    run = record["run"]
    checkpoint = Path(run["checkpoint"])
    if not checkpoint.exists():
        raise ShnetError(f"the run these embeddings came from is gone ({checkpoint}); restore it, or re-encode with another run")
    stat = checkpoint.stat()
    if (stat.st_size, stat.st_mtime_ns) != (run["size"], run["mtime_ns"]) and file_sha256(checkpoint) != run["sha256"]:
        raise ShnetError(
            f"{checkpoint} has changed since these embeddings were encoded (sha256 differs); "
            "its queries would not match them: re-run `shnet encode` into a new -o directory"
        )
    return checkpoint


def load_text_side(record: dict, device: torch.device, bert_path: str | None = None) -> TextSide:
    """The store's run, text side only."""
    from ..trainer.checkpoint import FORMAT, load_model
    from ..trainer.model import ModelConfig, build_text_encoder
    from ..trainer.text_encoders import tokenizer_from_state
    from ..weights import load_state_strict, load_weights_file

    checkpoint = verified_checkpoint(record)
    payload = load_weights_file(checkpoint, extra_safe_globals=(argparse.Namespace,))
    if isinstance(payload, dict) and payload.get("format") == FORMAT and payload.get("tokenizer"):
        config = ModelConfig.from_dict(payload["config"])
        encoder = build_text_encoder(config)
        prefix = "txt_enc."
        load_state_strict(encoder, {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}, source=f"{checkpoint} (text encoder)")
        tokenizer = tokenizer_from_state(payload["tokenizer"], bert_path)
        return TextSide(encoder.to(device).eval(), tokenizer, int(config.embed_size))
    loaded = load_model(checkpoint, bert_path=bert_path, map_location=device)
    if loaded.tokenizer is None:
        raise ShnetError(f"{checkpoint} carries no tokenizer (a reference checkpoint); pass --bert-path with its bert-base-uncased folder")
    return TextSide(loaded.model.txt_enc, loaded.tokenizer, int(loaded.config.embed_size))


@torch.no_grad()
def encode_queries(side: TextSide, texts: Sequence[str], device: torch.device) -> np.ndarray:
    """l2-normalised query embeddings [len(texts), D] (float32), as `shnet encode` embeds captions."""
    from ..trainer.data import collate_tokens

    out = []
    for lo in range(0, len(texts), _BATCH):
        tokens, lengths = collate_tokens([side.tokenizer.encode(t) for t in texts[lo : lo + _BATCH]], side.tokenizer.pad_id)
        out.append(side.encoder(tokens.to(device), lengths).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, side.embed_size), np.float32)
