"""An embedding store written straight from given vectors, through the writer `shnet encode` uses
(no model needed), for the tests of exact search, its projections and the index."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from shnet.cache.store import image_list_digest
from shnet.retrieval.store import FORMAT, FORMAT_VERSION, EmbeddingStore


def write_vector_store(root, vectors: np.ndarray, shard_size: int) -> EmbeddingStore:
    """A store holding ``vectors`` as float16 image embeddings in shards of ``shard_size`` rows."""
    store = EmbeddingStore(root)
    ids = [f"v{i}" for i in range(len(vectors))]
    shards = (len(vectors) + shard_size - 1) // shard_size
    store.save_record(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dimension": vectors.shape[1],
            "dtype": "float16",
            "images": {"rows": len(vectors), "shard_size": shard_size, "shards": shards, "image_list_sha256": image_list_digest(ids)},
        }
    )
    for s in range(shards):
        rows = slice(s * shard_size, (s + 1) * shard_size)
        store.write_shard("images", s, pa.table({"image_id": ids[rows], "path": [""] * len(ids[rows])}), vectors[rows], "float16")
    return store
