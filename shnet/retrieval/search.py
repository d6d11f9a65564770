"""``shnet search``: top-k text-to-image and image-to-text over an embedding store.

Exact search reads the shards' memory-mapped matrices chunk by chunk (see :mod:`shnet.retrieval.topk`),
so memory holds one chunk, never the whole matrix. ``ann`` asks the FAISS index built by
``shnet encode --index`` instead (see :mod:`shnet.retrieval.index`). A text query loads the run's
tokenizer and text encoder only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ShnetError
from .store import EmbeddingStore
from .topk import exact_top_k


@dataclass
class Hit:
    rank: int
    score: float
    row: int
    fields: dict  # image_id/path, or caption_id/caption/image_id


@dataclass
class QueryResult:
    query: str
    part: str
    method: str
    hits: list[Hit] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"query": self.query, "searched": self.part, "method": self.method, "hits": [{"rank": h.rank, "score": h.score, **h.fields} for h in self.hits]}


IMAGE_FIELDS = ["image_id", "path"]
CAPTION_FIELDS = ["caption_id", "caption", "image_id", "image", "split"]


def top_k(store: EmbeddingStore, part: str, queries: np.ndarray, k: int, method: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    if k < 1:
        raise ShnetError(f"-k must be at least 1 (got {k})")
    if method == "ann":
        if part != "images":
            raise ShnetError("the approximate index covers the images; search captions (--image) exactly")
        from .index import ann_top_k

        return ann_top_k(store, queries, k)
    if method != "exact":
        raise ShnetError(f"unknown search method {method!r} (exact or ann)")
    return exact_top_k(queries, store.matrix(part), k)


def _results(store: EmbeddingStore, part: str, labels: Sequence[str], scores, rows, method: str) -> list[QueryResult]:
    columns = IMAGE_FIELDS if part == "images" else CAPTION_FIELDS
    results = []
    for label, query_scores, query_rows in zip(labels, scores, rows):
        valid = query_rows >= 0
        fields = store.rows(part, query_rows[valid], columns)
        hits = [Hit(rank + 1, float(s), int(r), f) for rank, (s, r, f) in enumerate(zip(query_scores[valid], query_rows[valid], fields))]
        results.append(QueryResult(label, part, method, hits))
    return results


def search_text(
    root: str | Path, texts: Sequence[str], k: int = 10, method: str = "exact", device: str = "auto", bert_path: str | None = None
) -> list[QueryResult]:
    """Text-to-image: each text encoded by the store's run, its ``k`` best images."""
    if not texts:
        raise ShnetError("give a query text, e.g. shnet search EMB \"a dog on a red sofa\"")
    from ..devices import resolve_device
    from .query import encode_queries, load_text_side

    store = EmbeddingStore(root)
    record = store.record()
    torch_device = resolve_device(device)
    queries = encode_queries(load_text_side(record, torch_device, bert_path), list(texts), torch_device)
    scores, rows = top_k(store, "images", queries, k, method)
    return _results(store, "images", texts, scores, rows, method)


def search_image(root: str | Path, image_id: str, k: int = 10) -> QueryResult:
    """Image-to-text: the stored embedding of ``image_id`` against every encoded caption (no model loaded)."""
    store = EmbeddingStore(root)
    store.part("captions")
    _, embedding = store.find("images", "image_id", image_id)
    scores, rows = top_k(store, "captions", embedding[None].astype(np.float32), k)
    return _results(store, "captions", [image_id], scores, rows, "exact")[0]
