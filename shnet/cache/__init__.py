"""The cache contract both halves of shnet share: the on-disk layout, atomic shard commits, the
cache record, readers, inspect/verify (and their commands), and captions (caption files and the
captions a cache carries). Import/export of the SCAN/3SHNet ``.npy`` sets is :mod:`shnet.npy_sets`.

The pipeline writes caches through it and the trainer reads them through it; neither reaches into
the other.
"""

from .store import (
    CACHE_RECORD,
    FORMAT_VERSION,
    IMAGES_TABLE,
    Cache,
    CacheLock,
    ShardWriter,
    create_cache,
    write_stage,
)
from .streaming import write_stage_chunks

__all__ = [
    "CACHE_RECORD",
    "FORMAT_VERSION",
    "IMAGES_TABLE",
    "Cache",
    "CacheLock",
    "ShardWriter",
    "create_cache",
    "write_stage",
    "write_stage_chunks",
]
