"""Writing a whole stage from a stream of row blocks, shard by shard, never holding the stage in RAM.

:func:`write_stage_chunks` takes an iterator of blocks (``{array name: [rows, ...]}``, consecutive
rows in the cache's image order, any block size) and routes their rows into one
:class:`~shnet.cache.store.ShardWriter` after another: a block that crosses a shard boundary is
split, a shard is committed as soon as its last row arrived. Only one block and the open HDF5
file of one shard are held at a time (``shnet import`` of a precomputed set uses it).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from ..errors import CacheError
from .store import Cache, ShardWriter, record_stage_config


def write_stage_chunks(
    cache: Cache,
    stage: str,
    config: Mapping,
    blocks: Iterable[Mapping[str, np.ndarray]],
    table_columns: Iterable[str] = (),
    attrs: Mapping | None = None,
) -> int:
    """Write every shard of ``stage`` from ``blocks``; returns the number of rows written.

    Every block maps the same array names to arrays of equal length (the first block fixes names,
    per-image shapes and dtypes). ``table_columns`` names 1-d arrays that are also scalar columns of
    the stage's per-image table (e.g. ``num_boxes``). Every image of the cache gets a row with
    status ok; the blocks must hold exactly as many rows as the cache has images.
    """
    images = cache.images()
    record_stage_config(cache, stage, config)
    columns = list(table_columns)
    shard_attrs = {"config": dict(config), **dict(attrs or {})}
    shard_rows = images.groupby("shard", sort=True).size()
    shards = iter(shard_rows.items())
    writer: ShardWriter | None = None
    filled = written = 0
    names: list[str] | None = None
    try:
        for block in blocks:
            lengths = {name: len(values) for name, values in block.items()}
            if names is None:
                names = list(block)
            if sorted(block) != sorted(names) or len(set(lengths.values())) > 1:
                raise CacheError(f"internal: stage '{stage}' got a block with arrays {lengths}, expected {names} of one length")
            size, start = next(iter(lengths.values())), 0
            while start < size:
                if writer is None:
                    writer, filled = _open_shard(cache, stage, shards, shard_attrs, block, written)
                take = min(size - start, writer.num_rows - filled)
                for name, values in block.items():
                    writer.write(name, slice(filled, filled + take), values[start : start + take])
                filled, start, written = filled + take, start + take, written + take
                if filled == writer.num_rows:
                    _commit(writer, images, columns)
                    writer = None
        if writer is not None or next(shards, None) is not None:
            raise CacheError(f"stage '{stage}': {written} rows given for the {len(images)} images of {cache.root}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return written


def _open_shard(cache: Cache, stage: str, shards, attrs: Mapping, block: Mapping[str, np.ndarray], written: int) -> tuple[ShardWriter, int]:
    entry = next(shards, None)
    if entry is None:
        raise CacheError(f"stage '{stage}': more rows given than the {written} images of {cache.root}")
    shard, rows = entry
    writer = ShardWriter(cache, stage, int(shard), int(rows), attrs)
    for name, values in block.items():
        writer.create(name, values.shape[1:], values.dtype)
    return writer, 0


def _commit(writer: ShardWriter, images: pd.DataFrame, columns: list[str]) -> None:
    part = images[images["shard"] == writer.shard]
    table = pd.DataFrame({"image_id": part["image_id"].to_numpy(), "row": part["row"].to_numpy(), "status": "ok", "error": "", "seconds": 0.0})
    for column in columns:
        table[column] = writer.h5[column][:]
    writer.commit(table)
