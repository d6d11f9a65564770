"""Model checkpoints: shnet's own format, and the checkpoints of the 3SHNet reference implementation.

shnet format: one ``torch.save`` dict holding only tensors and plain containers (it loads with
``weights_only=True``): ``format``/``format_version``, the model ``config``, the ``tokenizer`` state,
the ``state_dict`` and ``extra`` (optimizer/scheduler state, epoch, rng states, metrics, options).

Reference format: ``{"epoch", "model": [image state dict, text state dict], "best_rsum", "opt":
argparse.Namespace, "Eiters"}``, keys possibly prefixed ``module.``. It is read with weights-only
unpickling, ``argparse.Namespace`` being the one class allowed besides tensors and containers.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..weights import load_state_strict, load_weights_file, strip_prefix
from ..cache.schema import NUM_CLASSES
from ..errors import CheckpointMismatchError, ShnetError
from ..fileio import atomic_open
from .model import ModelConfig, SHNet, build_model, config_of
from .text_encoders import (
    BertTokenizerAdapter,
    Tokenizer,
    bert_architecture_from_weights,
    tokenizer_from_state,
)

FORMAT = "shnet-model"
FORMAT_VERSION = 1

_PLAIN_LEAVES = (str, bytes, bytearray, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, collections.OrderedDict, collections.Counter, list, tuple, set)

# Buffers that older transformers releases saved with BERT and newer ones recompute: dropped when
# they hold the values that are recomputed.
_RECOMPUTED_BERT_BUFFERS = {
    "bert.embeddings.position_ids": lambda t: torch.equal(t.flatten(), torch.arange(t.numel(), dtype=t.dtype)),
    "bert.embeddings.token_type_ids": lambda t: not bool(t.any()),
}


@dataclass
class LoadedModel:
    model: SHNet
    config: ModelConfig
    tokenizer: Tokenizer | None
    extra: dict
    source: str  # "shnet" | "reference"


def _check_plain(obj, where: str) -> None:
    """Raise unless ``obj`` is made of tensors and plain containers only (what weights-only loading reads)."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_LEAVES:
        return
    if type(obj) not in _PLAIN_CONTAINERS:
        raise ShnetError(
            f"cannot save {where}: it holds a {type(obj).__module__}.{type(obj).__qualname__}, which a weights-only "
            "load refuses; store tensors, numbers, strings and plain dicts/lists/tuples instead"
        )
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} (a key)")
            _check_plain(value, f"{where}[{key!r}]")
    else:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")


def save_checkpoint(path, model: SHNet, cfg: ModelConfig, tokenizer: Tokenizer | None, extra: dict) -> None:
    """Write a shnet checkpoint atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path).expanduser()
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel wrapper
    _check_plain(extra, "extra")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shnet_version": __version__,
        "config": config_of(model, cfg).to_dict(),
        "tokenizer": tokenizer.state() if tokenizer is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    _check_plain(payload["config"], "the model config")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        torch.save(payload, fh)


def load_model(path, bert_path: str | None = None, map_location="cpu", seg_map_mode: str | None = None) -> LoadedModel:
    """Load a shnet or reference checkpoint strictly (every key used, every shape equal), in eval mode.

    ``bert_path``: a local bert-base-uncased folder; a reference checkpoint needs it for its
    tokenizer (its vocabulary only; the weights come from the checkpoint); without it the model
    loads with ``tokenizer=None``. ``seg_map_mode``: how a reference checkpoint's model is fed the
    64x64 class map ("raw" by default; unknown for the released checkpoints); a shnet checkpoint
    records its own and refuses another.
    """
    path = Path(path).expanduser()
    payload = load_weights_file(path, extra_safe_globals=(argparse.Namespace,))
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        loaded = _load_shnet(path, payload, bert_path, seg_map_mode)
    elif isinstance(payload, dict) and _is_reference_model(payload.get("model")):
        loaded = _load_reference(path, payload, bert_path, seg_map_mode)
    else:
        raise ShnetError(
            f"{path}: neither a shnet checkpoint nor a 3SHNet reference checkpoint (expected a dict with "
            "'format': 'shnet-model', or one with 'model': [image encoder state dict, text encoder state dict])"
        )
    loaded.model.to(map_location).eval()
    return loaded


def _is_reference_model(model) -> bool:
    return isinstance(model, (list, tuple)) and len(model) == 2 and all(isinstance(sd, dict) for sd in model)


def _load_shnet(path: Path, payload: dict, bert_path: str | None, seg_map_mode: str | None) -> LoadedModel:
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ShnetError(f"{path}: shnet checkpoint format version {version!r}; this shnet reads up to {FORMAT_VERSION} (upgrade shnet)")
    config = ModelConfig.from_dict(payload["config"])
    if seg_map_mode is not None and seg_map_mode != config.seg_map_mode:
        raise ShnetError(f"{path}: this model was trained with seg_map_mode={config.seg_map_mode!r}, not {seg_map_mode!r}")
    model = build_model(config)
    load_state_strict(model, payload["state_dict"], source=str(path))
    tokenizer = tokenizer_from_state(payload["tokenizer"], bert_path) if payload.get("tokenizer") else None
    return LoadedModel(model, config, tokenizer, payload.get("extra", {}), "shnet")


def _load_reference(path: Path, payload: dict, bert_path: str | None, seg_map_mode: str | None) -> LoadedModel:
    image_state, text_state = (strip_prefix(sd, "module.") for sd in payload["model"])
    opt = payload.get("opt")
    options = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    if options.get("precomp_enc_type", "basic") != "basic":
        raise ShnetError(
            f"{path}: a reference checkpoint of the end-to-end backbone variant (precomp_enc_type="
            f"{options['precomp_enc_type']!r}); shnet loads the precomputed-feature ('basic') model only"
        )
    for flag in ("no_imgnorm", "no_txtnorm"):
        if options.get(flag):
            raise ShnetError(f"{path}: trained with --{flag}; shnet's encoders always l2-normalise their embeddings")
    if "fc.weight" not in image_state:
        raise CheckpointMismatchError(f"{path}: the image encoder state dict (model[0]) lacks fc.weight; not a 3SHNet checkpoint")
    embed_size, region_dim = image_state["fc.weight"].shape
    for option, value in (("embed_size", embed_size), ("img_dim", region_dim)):
        if option in options and options[option] != value:
            raise CheckpointMismatchError(f"{path}: opt.{option}={options[option]} but img_enc.fc.weight has shape {tuple(image_state['fc.weight'].shape)}")
    category = image_state.get("embed_category.0.weight")
    architecture = bert_architecture_from_weights(text_state, folder=bert_path)
    for key, holds_recomputed_values in _RECOMPUTED_BERT_BUFFERS.items():
        if key in text_state and holds_recomputed_values(text_state[key]):
            del text_state[key]

    config = ModelConfig(
        level="region",
        embed_size=int(embed_size),
        region_dim=int(region_dim),
        num_classes=int(category.shape[1]) if category is not None else NUM_CLASSES,
        seg_map_mode=seg_map_mode or "raw",
        text_encoder="bert",
        bert_path=bert_path,
        bert_config=architecture,
    )
    model = build_model(config)
    state = {f"img_enc.{k}": v for k, v in image_state.items()}
    state.update({f"txt_enc.{k}": v for k, v in text_state.items()})
    load_state_strict(model, state, source=str(path))

    tokenizer = None
    if bert_path is not None:
        tokenizer = BertTokenizerAdapter.from_folder(bert_path)
        if tokenizer.vocab_size != architecture["vocab_size"]:
            raise ShnetError(
                f"{bert_path}: its vocabulary has {tokenizer.vocab_size} tokens but the BERT in {path} has "
                f"{architecture['vocab_size']}; give the bert-base-uncased folder the model was trained with"
            )
    extra = {key: payload[key] for key in ("epoch", "best_rsum", "Eiters") if key in payload}
    extra["opt"] = options
    return LoadedModel(model, config, tokenizer, extra, "reference")
