"""The approximate index (``shnet encode --index``): FAISS IVF with fp16 vectors, inner product.

The image embeddings are clustered into ``nlist`` lists (k-means on a sample); a query scans the
``nprobe`` lists whose centroids are closest. ``nprobe`` is chosen at build time: the smallest
power of two whose recall@10 against exact search reaches the target on held-out queries (stored
images kept out of k-means and out of the index while it is tuned, then added), judged by the
lower 97.5% confidence bound of the mean so that new queries reach it too. When captions were encoded, the recall for
caption queries (the real text-to-image queries) is measured as well. The record keeps every
measured point, so the trade-off is visible, not a guess.

faiss is an optional dependency (``pip install -c constraints.txt 'shnet[faiss]'``).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ShnetError
from ..fileio import atomic_write_json, read_json
from .topk import exact_top_k
from .store import EmbeddingStore

INDEX_DIR = "index"
INDEX_FILE = "images.faiss"
INDEX_RECORD = "index.json"
RECALL_AT = 10
_TRAIN_POINTS_PER_LIST = 40
_KMEANS_ITERATIONS = 10
_MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ShnetError("the approximate index needs faiss: pip install -c constraints.txt 'shnet[faiss]' (or faiss-cpu)") from None
    return faiss


def list_count(rows: int) -> int:
    """4 sqrt(N) lists (4000 for a million vectors; FAISS advises 4-16 sqrt(N)), fewer when there are
    too few vectors to train them. Fewer lists than the data has groups of neighbours leave each list
    a mixture that k-means cannot align with those groups, and recall at small nprobe collapses."""
    return max(1, min(round(4 * math.sqrt(rows)), rows // _MIN_POINTS_PER_LIST))


def query_recalls(approximate: np.ndarray, exact: np.ndarray, k: int = RECALL_AT) -> np.ndarray:
    """Per query, the share of its exact top-k found in its approximate top-k."""
    return np.array([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approximate, exact)])


def recall_at(approximate: np.ndarray, exact: np.ndarray, k: int = RECALL_AT) -> float:
    return float(query_recalls(approximate, exact, k).mean())


def lower_bound(recalls: np.ndarray) -> float:
    """The one-sided 97.5% lower confidence bound of the mean recall (normal approximation)."""
    return float(recalls.mean() - 1.96 * recalls.std(ddof=1) / math.sqrt(len(recalls))) if len(recalls) > 1 else float(recalls.mean())


def build_index(
    root: str | Path,
    target_recall: float = 0.95,
    queries: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Build, tune and save the index of the store's images; returns its record."""
    faiss = _faiss()
    if not 0 < target_recall <= 1:
        raise ShnetError(f"--index-recall must lie in (0, 1] (got {target_recall})")
    store = EmbeddingStore(root)
    record, entry = store.record(), store.complete_part("images")
    n, dim = entry["rows"], record["dimension"]
    started = time.perf_counter()
    nlist = list_count(n)
    rng = np.random.default_rng(seed)
    if n < 2:
        raise ShnetError(f"{store.root} holds {n} image embedding(s); an index needs at least 2 (exact search is instant here)")
    query_rows = np.sort(rng.choice(n, size=min(queries, max(1, n // 10)), replace=False))
    candidates = np.setdiff1d(np.arange(n), query_rows)
    train_rows = np.sort(rng.choice(candidates, size=min(len(candidates), nlist * _TRAIN_POINTS_PER_LIST), replace=False))
    train, held_out = _gather(store, train_rows), _gather(store, query_rows)

    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = _KMEANS_ITERATIONS
    index.cp.seed = seed
    log(f"index: training {nlist} lists on {len(train)} of {n} vectors")
    index.train(train)
    for chunk in store.chunks("images"):
        rows = np.arange(chunk.start, chunk.start + len(chunk.embeddings))
        keep = ~np.isin(rows, query_rows, assume_unique=True)
        index.add_with_ids(np.ascontiguousarray(chunk.embeddings[keep], dtype=np.float32), rows[keep])
    build_seconds = time.perf_counter() - started

    log(f"index: tuning nprobe for recall@{RECALL_AT} >= {target_recall} on {len(held_out)} held-out queries")
    _, exact = exact_top_k(held_out, store.matrix("images"), RECALL_AT, exclude=query_rows)
    curve, nprobe = {}, nlist
    for probe in sorted({min(2**p, nlist) for p in range(int(math.log2(nlist)) + 2)}):
        index.nprobe = probe
        _, found = index.search(held_out, RECALL_AT)
        recalls = query_recalls(found, exact)
        curve[probe] = float(recalls.mean())
        if lower_bound(recalls) >= target_recall:
            nprobe = probe
            break
    index.nprobe = nprobe
    started = time.perf_counter()
    index.add_with_ids(held_out, query_rows)  # held out for tuning only: the index covers every image
    build_seconds += time.perf_counter() - started
    caption_recall = _caption_recall(store, index, queries, rng) if "captions" in record else None

    folder = store.root / INDEX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{INDEX_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / INDEX_FILE)
    index_record = {
        "type": f"IVF{nlist},SQfp16",
        "metric": "inner_product",
        "vectors": n,
        "dimension": dim,
        "nlist": nlist,
        "nprobe": nprobe,
        "target_recall": target_recall,
        f"recall_at_{RECALL_AT}": curve[nprobe],
        "recall_by_nprobe": {str(k): v for k, v in curve.items()},
        "held_out_queries": len(held_out),
        f"caption_recall_at_{RECALL_AT}": caption_recall,
        "build_seconds": round(build_seconds, 3),
        "image_list_sha256": entry["image_list_sha256"],
    }
    atomic_write_json(folder / INDEX_RECORD, index_record)
    return index_record


def _gather(store: EmbeddingStore, rows: np.ndarray, part: str = "images") -> np.ndarray:
    """The embeddings of the given global rows of ``part``, float32."""
    return store.matrix(part).take(rows).astype(np.float32)


def _caption_recall(store: EmbeddingStore, index, queries: int, rng: np.random.Generator) -> float:
    """Recall@10 of the tuned index for caption (text-to-image) queries."""
    entry = store.complete_part("captions")
    rows = np.sort(rng.choice(entry["rows"], size=min(entry["rows"], queries), replace=False))
    texts = _gather(store, rows, "captions")
    _, exact = exact_top_k(texts, store.matrix("images"), RECALL_AT)
    _, found = index.search(texts, RECALL_AT)
    return recall_at(found, exact)


def load_index(store: EmbeddingStore):
    """The saved index with its tuned nprobe, refusing one built for another image list."""
    faiss = _faiss()
    folder = store.root / INDEX_DIR
    if not (folder / INDEX_FILE).exists():
        raise ShnetError(f"{store.root} has no approximate index; build it with `shnet encode ... -o {store.root} --index`")
    index_record = read_json(folder / INDEX_RECORD, "the index record", f"rebuild it with `shnet encode ... -o {store.root} --index`")
    if index_record["image_list_sha256"] != store.part("images")["image_list_sha256"]:
        raise ShnetError(f"{folder} was built for other images than the store holds now; rebuild it with `shnet encode ... --index`")
    index = faiss.read_index(str(folder / INDEX_FILE))
    index.nprobe = index_record["nprobe"]
    return index


def ann_top_k(store: EmbeddingStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, rows = load_index(store).search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows
