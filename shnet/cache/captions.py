"""Captions that travel with a cache: ``CACHE/captions.parquet`` (image_id, caption, split).

A cache made by ``shnet import`` holds its captions, in the order of the imported caption files,
so that ``shnet train --cache CACHE`` and ``shnet evaluate`` need no separate caption file. The
table has the columns of shnet's CSV/Parquet caption format, so any caption reader takes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import ShnetError
from ..fileio import read_parquet
from .store import Cache, atomic_write_parquet

CAPTIONS_TABLE = "captions.parquet"
CAPTION_COLUMNS = ["image_id", "caption", "split"]


def write_cache_captions(cache: Cache, frame: pd.DataFrame) -> None:
    """Store ``frame`` (image_id, caption, split; rows in caption order) as the cache's captions."""
    missing = [c for c in CAPTION_COLUMNS if c not in frame]
    if missing:
        raise ShnetError(f"internal: a caption table needs columns {CAPTION_COLUMNS}, lacks {missing}")
    unknown = set(frame["image_id"]) - set(cache.images()["image_id"])
    if unknown:
        raise ShnetError(f"captions name {len(unknown)} image(s) that {cache.root} does not hold, e.g. {sorted(unknown)[:3]}")
    atomic_write_parquet(cache.root / CAPTIONS_TABLE, frame[CAPTION_COLUMNS].reset_index(drop=True))
    counts = frame.groupby("split", sort=True).size()
    cache.record["captions"] = {"table": CAPTIONS_TABLE, "captions": {str(k): int(v) for k, v in counts.items()}}
    cache.save_record()


def cache_captions_path(cache: Cache) -> Path | None:
    """The cache's caption table, or None when it holds no captions."""
    if "captions" not in cache.record:
        return None
    path = cache.root / cache.record["captions"]["table"]
    if not path.is_file():
        raise ShnetError(f"{cache.root}/cache.json records captions in {path.name}, which is missing; re-import the cache")
    return path


def read_cache_captions(cache: Cache) -> pd.DataFrame | None:
    path = cache_captions_path(cache)
    return None if path is None else read_parquet(path, "the cache's captions", "re-import the cache (`shnet import`)")


def stored_captions(cache_roots: Sequence[str | Path]) -> str | None:
    """The caption table that the given caches hold (None when none holds one); several caches
    holding captions is ambiguous and refused."""
    found = [path for path in (cache_captions_path(Cache(root)) for root in cache_roots) if path is not None]
    if len(found) > 1:
        raise ShnetError(f"several caches hold captions ({', '.join(str(p.parent) for p in found)}); choose them with --captions FILE")
    return str(found[0]) if found else None
