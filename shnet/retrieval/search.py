"""``shnet search``: top-k text-to-image and image-to-text over an embedding store.

Exact search streams the store chunk by chunk (one matrix product per chunk, on the chosen device)
and keeps a running top-k, so memory holds one chunk, never the whole matrix. ``ann`` asks the
FAISS index built by ``shnet encode --index`` instead (see :mod:`shnet.retrieval.index`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import ShnetError
from ..trainer.device import resolve_device
from .encode import encode_texts, verified_run
from .store import Chunk, EmbeddingStore

CHUNK_ROWS = 32768


def exact_top_k(
    queries: np.ndarray, chunks: Iterable[Chunk], k: int, device: torch.device, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of ``queries`` [Q, D] with every chunk's rows; the ``k`` best per query as
    (scores [Q, k'], global rows [Q, k']) in descending order, k' = min(k, rows seen). Rows in
    ``exclude`` (sorted global rows) are never returned."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(device)
    best_scores = torch.empty((len(queries), 0), device=device)
    best_rows = torch.empty((len(queries), 0), dtype=torch.long, device=device)
    for chunk in chunks:
        matrix = torch.from_numpy(np.array(chunk.embeddings)).to(device).float()
        scores = q @ matrix.t()
        if exclude is not None:
            lo, hi = np.searchsorted(exclude, [chunk.start, chunk.start + len(matrix)])
            scores[:, torch.from_numpy(exclude[lo:hi] - chunk.start).to(device)] = float("-inf")
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top.values], dim=1)
        best_rows = torch.cat([best_rows, top.indices + chunk.start], dim=1)
        if best_scores.shape[1] > k:
            keep = best_scores.topk(k, dim=1)
            best_scores, best_rows = keep.values, best_rows.gather(1, keep.indices)
    order = best_scores.argsort(dim=1, descending=True)
    return best_scores.gather(1, order).cpu().numpy(), best_rows.gather(1, order).cpu().numpy()


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


def top_k(store: EmbeddingStore, part: str, queries: np.ndarray, k: int, method: str, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    if k < 1:
        raise ShnetError(f"-k must be at least 1 (got {k})")
    if method == "ann":
        if part != "images":
            raise ShnetError("the approximate index covers the images; search captions (--image) exactly")
        from .index import ann_top_k

        return ann_top_k(store, queries, k)
    if method != "exact":
        raise ShnetError(f"unknown search method {method!r} (exact or ann)")
    return exact_top_k(queries, store.chunks(part, CHUNK_ROWS), k, device)


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
    store = EmbeddingStore(root)
    record = store.record()
    torch_device = resolve_device(device)
    loaded = verified_run(record, torch_device, bert_path)
    queries = encode_texts(loaded, texts, 256, torch_device)
    scores, rows = top_k(store, "images", queries, k, method, torch_device)
    return _results(store, "images", texts, scores, rows, method)


def search_image(root: str | Path, image_id: str, k: int = 10, device: str = "auto") -> QueryResult:
    """Image-to-text: the stored embedding of ``image_id`` against every encoded caption."""
    store = EmbeddingStore(root)
    store.part("captions")
    _, embedding = store.find("images", "image_id", image_id)
    scores, rows = top_k(store, "captions", embedding[None].astype(np.float32), k, "exact", resolve_device(device))
    return _results(store, "captions", [image_id], scores, rows, "exact")[0]
