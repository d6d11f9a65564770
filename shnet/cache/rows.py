"""A stage's arrays read for any (shard, row) pairs, in their order, each shard file opened once:
what a reader that walks images in an order of its own (``shnet export``) needs, block by block."""

from __future__ import annotations

import h5py
import numpy as np

from .store import Cache


class ShardRows:
    """The shard files of a cache, each opened once while the reader is open (a context manager)."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.open: dict[tuple[str, int], h5py.File] = {}

    def read(self, stage: str, name: str, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The arrays of the given (shard, row) pairs, in that order."""
        if (shards == shards[0]).all() and (np.diff(rows) == 1).all():  # the common case: consecutive rows of one shard
            return self._dataset(stage, int(shards[0]), name)[int(rows[0]) : int(rows[-1]) + 1]
        block = None
        for shard in np.unique(shards):
            at = np.flatnonzero(shards == shard)
            wanted, inverse = np.unique(rows[at], return_inverse=True)
            dataset = self._dataset(stage, int(shard), name)
            values = dataset[int(wanted[0]) : int(wanted[-1]) + 1] if wanted[-1] - wanted[0] == len(wanted) - 1 else dataset[wanted]
            if block is None:
                block = np.empty((len(shards),) + values.shape[1:], dtype=values.dtype)
            block[at] = values[inverse]
        return block

    def _dataset(self, stage: str, shard: int, name: str) -> h5py.Dataset:
        if (stage, shard) not in self.open:
            self.open[(stage, shard)] = self.cache.open_arrays(stage, shard)
        return self.open[(stage, shard)][name]

    def __enter__(self) -> "ShardRows":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.open.values():
            handle.close()
        self.open = {}
