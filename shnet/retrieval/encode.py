"""``shnet encode``: embeddings of every usable image of the caches (and of captions) with a trained run.

The work is planned in shards of ``shard_size`` rows; a shard is encoded in batches and committed
atomically (matrix, table, then its done record; see :mod:`shnet.retrieval.store`), and a done
shard is never redone, so a killed encode resumes where it
stopped. The record names the run (checkpoint path and sha256, epoch) and the caches; re-running
into the same store with another run, other caches or another dtype is refused, not mixed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from .. import __version__
from ..cache import Cache
from ..cache.store import image_list_digest
from ..fileio import file_sha256
from ..devices import resolve_device
from ..errors import ShnetError
from ..cache.captions import CaptionSet, match_images, read_captions, stored_captions
from ..trainer.checkpoint import LoadedModel, load_model
from ..cache.features import FeatureIndex
from ..trainer.data import caption_loader, image_loader
from ..trainer.run import resolve_checkpoint
from .store import DTYPES, FORMAT, FORMAT_VERSION, EmbeddingStore

_EXAMPLES = 5
_REPORT_SECONDS = 10.0  # at most one progress line per this many seconds


@dataclass
class EncodeRequest:
    run: str
    caches: Sequence[str]
    output: str
    captions: str | None = None  # None: the captions a cache holds (an imported cache), if any
    split: str | None = None  # captions of one split only (default: every split)
    dtype: str = "float32"
    batch_size: int = 256
    shard_size: int = 10000
    workers: int = 0
    device: str = "auto"
    bert_path: str | None = None


@dataclass
class EncodeReport:
    store: Path
    encoded: dict[str, int] = field(default_factory=dict)  # part -> rows encoded by this call
    totals: dict[str, int] = field(default_factory=dict)  # part -> rows in the store
    skipped_images: int = 0
    seconds: float = 0.0


def run_identity(checkpoint: Path, loaded: LoadedModel) -> dict:
    """What names the model the embeddings came from (size and mtime let a reader skip re-hashing)."""
    stat = checkpoint.stat()
    return {
        "checkpoint": str(checkpoint.resolve()),
        "sha256": file_sha256(checkpoint),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "epoch": loaded.extra.get("epoch"),
        "source": loaded.source,
        "level": loaded.config.level,
        "text_encoder": loaded.config.text_encoder,
    }


def load_run(run: str | Path, device: torch.device, bert_path: str | None = None) -> tuple[Path, LoadedModel]:
    checkpoint = resolve_checkpoint(run)
    loaded = load_model(checkpoint, bert_path=bert_path, map_location=device)
    if loaded.tokenizer is None:
        raise ShnetError(f"{checkpoint} carries no tokenizer (a reference checkpoint); pass --bert-path with its bert-base-uncased folder")
    return checkpoint, loaded


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int, device: torch.device) -> np.ndarray:
    """l2-normalised text embeddings [len(texts), D] (float32) with the run's tokenizer and text encoder."""
    captions = CaptionSet(images=["query"], captions=list(texts), caption_image=np.zeros(len(texts), np.int64), split="query", source="query")
    loaded.model.eval()
    out = [
        loaded.model.encode_texts(batch["tokens"].to(device), batch["token_lengths"]).float().cpu().numpy()
        for batch in caption_loader(captions, loaded.tokenizer, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, loaded.config.embed_size), np.float32)


@torch.no_grad()
def encode_images(loaded: LoadedModel, index: FeatureIndex, image_ids: Sequence[str], batch_size: int, workers: int, device: torch.device) -> np.ndarray:
    reader = index.reader(image_ids)
    try:
        loaded.model.eval()
        out = [
            loaded.model.encode_images({k: v.to(device, non_blocking=True) for k, v in batch["images"].items()}).float().cpu().numpy()
            for batch in image_loader(reader, batch_size, workers, pin_memory=device.type == "cuda")
        ]
    finally:
        reader.close()
    return np.concatenate(out)


def image_paths(caches: Sequence[Cache]) -> dict[str, str]:
    """image_id -> the image file of the first cache that has one."""
    paths: dict[str, str] = {}
    for cache in caches:
        images = cache.images()
        for image_id, path in zip(images["image_id"].astype(str), images["path"].astype(str)):
            if path and image_id not in paths:
                paths[image_id] = path
    return paths


def caption_rows(path: str, split: str | None, cache_ids: Sequence[str]) -> pd.DataFrame:
    """Every caption (of ``split``) with its image name and matched cache image_id (None when unmatched)."""
    frame = read_captions(path).frame
    if split is not None:
        frame = frame[frame["split"].astype(str) == split]
        if frame.empty:
            raise ShnetError(f"{path} has no captions in split '{split}'")
    match = match_images(frame["image"].astype(str).unique(), cache_ids)
    return pd.DataFrame(
        {
            "caption_id": np.arange(len(frame), dtype=np.int64),
            "image": frame["image"].astype(str).to_numpy(),
            "image_id": [match.cache_ids.get(name) for name in frame["image"].astype(str)],
            "split": frame["split"].astype(str).to_numpy(),
            "caption": frame["caption"].astype(str).to_numpy(),
        }
    )


def _plan(rows: int, shard_size: int) -> int:
    return (rows + shard_size - 1) // shard_size


def _check_same(store: EmbeddingStore, part: str, old: dict, new: dict, keys: Sequence[str]) -> None:
    diffs = [f"  {part}.{k}: store has {old.get(k)!r}, this run gives {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    if diffs:
        what = "embeddings" if part in ("run", "store") else f"{part} embeddings"
        raise ShnetError(
            f"{store.root} holds {what} made otherwise:\n" + "\n".join(diffs) + "\n"
            "Refusing to mix them: encode into a new -o directory, or re-run with the store's settings."
        )


def encode(request: EncodeRequest, log: Callable[[str], None] = print) -> EncodeReport:
    """Encode (or finish encoding) the images of ``request.caches`` and the captions into ``request.output``."""
    if request.dtype not in DTYPES:
        raise ShnetError(f"--dtype must be one of {', '.join(DTYPES)} (got {request.dtype!r})")
    for name in ("batch_size", "shard_size"):
        if getattr(request, name) < 1:
            raise ShnetError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(request, name)})")
    started = time.perf_counter()
    device = resolve_device(request.device)
    checkpoint, loaded = load_run(request.run, device, request.bert_path)
    config = loaded.config
    index = FeatureIndex(list(request.caches), config.level)
    index.check_model_fits(config, loaded.extra.get("class_order"), str(checkpoint))
    usable = [i for i in index.image_ids if index.problem(i) is None]
    skipped = {i: index.problem(i) for i in index.image_ids if index.problem(i) is not None}
    if not usable:
        raise ShnetError(f"no image of {', '.join(request.caches)} has usable {config.level} features; e.g. {next(iter(skipped.items()), ('', ''))}")
    paths = image_paths(index.caches)
    captions_file = request.captions or stored_captions(request.caches)
    captions = caption_rows(captions_file, request.split, index.image_ids) if captions_file else None

    store = EmbeddingStore(request.output)
    report = EncodeReport(store.root, skipped_images=len(skipped))
    with store.lock():
        store.remove_stale_temporaries()
        record = store.record() if store.exists() else None
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "shnet_version": __version__,
            "run": run_identity(checkpoint, loaded),
            "caches": [str(c.root) for c in index.caches],
            "dtype": request.dtype,
            "dimension": int(config.embed_size),
        }
        if record is None:
            record = dict(header)
        else:
            _check_same(store, "run", record["run"], header["run"], ("sha256",))
            _check_same(store, "store", record, header, ("caches", "dtype", "dimension"))

        images_entry = {
            "rows": len(usable),
            "shard_size": request.shard_size,
            "shards": _plan(len(usable), request.shard_size),
            "image_list_sha256": image_list_digest(usable),
            "skipped": len(skipped),
            "skipped_examples": dict(list(skipped.items())[:_EXAMPLES]),
        }
        if "images" in record:
            _check_same(store, "images", record["images"], images_entry, ("rows", "shard_size", "image_list_sha256"))
        record["images"] = images_entry

        if captions is not None:
            captions_entry = {
                "file": str(Path(captions_file).expanduser().resolve()),
                "sha256": file_sha256(Path(captions_file).expanduser()),
                "split": request.split,
                "rows": len(captions),
                "shard_size": request.shard_size,
                "shards": _plan(len(captions), request.shard_size),
                "unmatched": int(captions["image_id"].isna().sum()),
            }
            if "captions" in record:
                _check_same(store, "captions", record["captions"], captions_entry, ("sha256", "split", "rows", "shard_size"))
            record["captions"] = captions_entry
        store.save_record(record)

        if skipped:
            log(f"{len(skipped)} image(s) have no usable features and are not encoded, e.g. " + "; ".join(f"{k} ({v})" for k, v in list(skipped.items())[:_EXAMPLES]))
        report.encoded["images"] = _encode_part(
            store, "images", images_entry, record["dtype"], log,
            lambda rows: _image_shard(loaded, index, [usable[r] for r in rows], paths, request, device),
        )
        report.totals["images"] = len(usable)
        if captions is not None:
            report.encoded["captions"] = _encode_part(
                store, "captions", record["captions"], record["dtype"], log,
                lambda rows: _caption_shard(loaded, captions.iloc[rows], request, device),
            )
            report.totals["captions"] = len(captions)
    report.seconds = time.perf_counter() - started
    return report


def _encode_part(store: EmbeddingStore, part: str, entry: dict, dtype: str, log, make_shard: Callable[[range], tuple[pa.Table, np.ndarray]]) -> int:
    """Write every missing shard of ``part``; returns the rows encoded."""
    done, size, encoded = store.done_shards(part), entry["shard_size"], 0
    todo = [s for s in range(entry["shards"]) if s not in done]
    if not todo:
        log(f"{part}: all {entry['shards']} shard(s) already encoded")
        return 0
    log(f"{part}: encoding {len(todo)} of {entry['shards']} shard(s) ({entry['rows']} rows in all)")
    started = last_report = time.perf_counter()
    for done_count, shard in enumerate(todo, 1):
        rows = range(shard * size, min((shard + 1) * size, entry["rows"]))
        store.write_shard(part, shard, *make_shard(rows), dtype)
        encoded += len(rows)
        now = time.perf_counter()
        if now - last_report >= _REPORT_SECONDS or done_count == len(todo):
            log(f"{part}: {done_count}/{len(todo)} shard(s), {encoded} rows, {encoded / max(now - started, 1e-9):.0f} rows/s")
            last_report = now
    return encoded


def _image_shard(loaded, index, image_ids, paths, request, device) -> tuple[pa.Table, np.ndarray]:
    embeddings = encode_images(loaded, index, image_ids, request.batch_size, request.workers, device)
    table = pa.table({"image_id": pa.array(image_ids, pa.string()), "path": pa.array([paths.get(i, "") for i in image_ids], pa.string())})
    return table, embeddings


def _caption_shard(loaded, rows: pd.DataFrame, request, device) -> tuple[pa.Table, np.ndarray]:
    embeddings = encode_texts(loaded, rows["caption"].tolist(), request.batch_size, device)
    table = pa.table(
        {
            "caption_id": pa.array(rows["caption_id"].to_numpy(), pa.int64()),
            **{name: pa.array(rows[name].tolist(), pa.string()) for name in ("image", "image_id", "split", "caption")},
        }
    )
    return table, embeddings
