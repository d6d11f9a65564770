"""The approximate index (``shnet encode --index``): PCA, FAISS IVF, 4-bit product-quantised codes
scanned with SIMD (fast-scan), and the candidates re-ranked exactly from the store's matrix.

The vectors are projected on their first ``PCA_DIMENSIONS`` principal axes (real embeddings keep most
of their energy there; k-means, the coarse quantizer and the code scan get 8x cheaper than in 1024
dimensions), clustered into ``nlist`` lists (k-means on a sample, a flat coarse quantizer), and each
kept as one 4-bit code per two projected dimensions. A query scans the codes of its ``nprobe``
closest lists and takes the ``RERANK`` x k best; these are ranked by exact score by
:func:`shnet.retrieval.topk.candidate_top_k` (only those whose bfloat16 bound can reach the top k
are scored from the store's matrix), so the scores it returns are exact and only the candidate set
is approximate. Measured on 1M x 1024 structured vectors (benchmarks/search_speed.py, 2 shared
cores): codes of 8 or 4 raw dimensions each (PQ128/PQ256 without PCA) capped recall@10 at 0.93-0.94
whatever nprobe; an HNSW coarse quantizer capped it at 0.938 even with every list probed (lists its
graph search never reached). PCA256 with 1000 lists needed nprobe 128 for recall@10 0.98 (scanning
1000-1400 queries/s); PCA128 with 2000 lists reaches 0.96 at nprobe 64 and 0.98 at 128, scans
3000-4500 queries/s at 64 and builds in about a minute; 4000 lists scanned no faster for the same
recall and took 4 minutes to build. Re-ranking 10 or 20 x k capped recall at 0.87 and 0.954 on the
test's 50k x 128 set (near ties the 4-bit codes cannot order), 30 x k reaches 0.975.

``nprobe`` and the re-ranking factor are chosen at build time: the smallest power of two whose recall@10 against exact search
reaches the target on held-out queries (stored images kept out of training and out of the index
while it is tuned, then added), judged by the lower 97.5% confidence bound of the mean so that new
queries reach it too; then the smallest quarter step up to it from the power below that reaches it
as well (80, 96 or 112 between 64 and 128: each power doubles the codes scanned); then the fewest
candidates (10, 20 or ``RERANK`` x k) that reach it at that nprobe. When captions
were encoded, the recall for caption queries (the real text-to-image queries) is measured as well.
The record keeps every measured point.

faiss is an optional dependency (``pip install -c constraints.txt 'shnet[faiss]'``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ShnetError
from ..fileio import atomic_path, atomic_write_json, read_json
from .topk import Matrix, candidate_top_k, exact_top_k
from .store import EmbeddingStore

INDEX_DIR = "index"
INDEX_FILE = "images.faiss"
INDEX_RECORD = "index.json"
RECALL_AT = 10
RERANK = 30  # codes scanned keep at most RERANK x k candidates per query, re-ranked exactly
RERANK_STEPS = (10, 20)  # fewer tried at the tuned nprobe: each candidate costs a bounded re-score
PCA_DIMENSIONS = 128
_TRAIN_POINTS_PER_LIST = 40
_KMEANS_ITERATIONS = 10
_MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
_MAX_TRAIN = 100_000  # k-means and the codebooks learn from at most this many vectors


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ShnetError("the approximate index needs faiss: pip install -c constraints.txt 'shnet[faiss]' (or faiss-cpu)") from None
    return faiss


def list_count(rows: int) -> int:
    """2 sqrt(N) lists (2000 for a million vectors), fewer when there are too few vectors to train
    them. k-means grows with lists x training vectors (40 per list) x dimensions: on two shared
    cores 4 sqrt(N) lists took longer than the whole 3-minute budget for 1M vectors (in 1024 and in
    128 dimensions); 2 sqrt(N) in 128 dimensions builds in about a minute."""
    return max(1, min(round(2 * math.sqrt(rows)), rows // _MIN_POINTS_PER_LIST))


def index_type(rows: int, dimension: int) -> str:
    """The FAISS factory string for ``rows`` vectors of ``dimension``."""
    projected = min(dimension - dimension % 2, PCA_DIMENSIONS)
    if projected < 2:
        raise ShnetError(f"an approximate index needs embeddings of at least 2 dimensions (these have {dimension}); search exactly")
    return f"PCA{projected},IVF{list_count(rows)},PQ{projected // 2}x4fs"


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
    if n < 2:
        raise ShnetError(f"{store.root} holds {n} image embedding(s); an index needs at least 2 (exact search is instant here)")
    started = time.perf_counter()
    nlist = list_count(n)
    rng = np.random.default_rng(seed)
    matrix = store.matrix("images")
    query_rows = np.sort(rng.choice(n, size=min(queries, max(1, n // 10)), replace=False))
    candidates = np.setdiff1d(np.arange(n), query_rows)
    train_size = min(len(candidates), max(nlist * _TRAIN_POINTS_PER_LIST, 16 * _MIN_POINTS_PER_LIST), _MAX_TRAIN)
    train_rows = np.sort(rng.choice(candidates, size=train_size, replace=False))
    train, held_out = matrix.take(train_rows).astype(np.float32), matrix.take(query_rows).astype(np.float32)

    kind = index_type(n, dim)
    index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = _KMEANS_ITERATIONS
    ivf.cp.seed = seed
    log(f"index {kind}: training on {len(train)} of {n} vectors")
    index.train(train)
    del train
    for chunk in matrix.chunks(65536):
        rows = np.arange(chunk.start, chunk.start + len(chunk.embeddings))
        keep = ~np.isin(rows, query_rows, assume_unique=True)
        index.add_with_ids(np.ascontiguousarray(chunk.embeddings[keep], dtype=np.float32), rows[keep])
    build_seconds = time.perf_counter() - started

    log(f"index: tuning nprobe for recall@{RECALL_AT} >= {target_recall} on {len(held_out)} held-out queries")
    _, exact = exact_top_k(held_out, matrix, RECALL_AT, exclude=query_rows)
    curve: dict[int, float] = {}

    def reaches(probe: int) -> bool:
        ivf.nprobe = probe
        _, found = reranked_search(index, matrix, held_out, RECALL_AT)
        recalls = query_recalls(found, exact)
        curve[probe] = float(recalls.mean())
        return lower_bound(recalls) >= target_recall

    def reaches_with(rerank: int) -> bool:
        _, found = reranked_search(index, matrix, held_out, RECALL_AT, rerank)
        recalls = query_recalls(found, exact)
        by_rerank[rerank] = float(recalls.mean())
        return lower_bound(recalls) >= target_recall

    powers = sorted({min(2**p, nlist) for p in range(int(math.log2(nlist)) + 2)})
    nprobe = next((p for p in powers if reaches(p)), None)
    if nprobe is None:  # not even every list: the most there is
        nprobe = nlist
    else:  # a quarter, half or three quarters of the way up from the last power that fell short
        below = max((p for p in curve if p < nprobe), default=0)
        nprobe = next((p for p in sorted({below + (nprobe - below) * j // 4 for j in (1, 2, 3)} - {below, nprobe}) if reaches(p)), nprobe)
    ivf.nprobe = nprobe
    by_rerank = {RERANK: curve[nprobe]}
    rerank = next((r for r in RERANK_STEPS if reaches_with(r)), RERANK)
    started = time.perf_counter()
    index.add_with_ids(held_out, query_rows)  # held out for tuning only: the index covers every image
    build_seconds += time.perf_counter() - started
    caption_recall = _caption_recall(store, index, matrix, queries, rng, rerank) if "captions" in record else None

    folder = store.root / INDEX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    index_record = {
        "type": kind,
        "rerank": rerank,
        "metric": "inner_product",
        "vectors": n,
        "dimension": dim,
        "nlist": nlist,
        "nprobe": nprobe,
        "target_recall": target_recall,
        f"recall_at_{RECALL_AT}": by_rerank[rerank],
        "recall_by_nprobe": {str(k): v for k, v in sorted(curve.items())},
        "recall_by_rerank": {str(k): v for k, v in sorted(by_rerank.items())},
        "held_out_queries": len(held_out),
        f"caption_recall_at_{RECALL_AT}": caption_recall,
        "build_seconds": round(build_seconds, 3),
        "image_list_sha256": entry["image_list_sha256"],
    }
    atomic_write_json(folder / INDEX_RECORD, index_record)
    return index_record


def reranked_search(index, matrix: Matrix, queries: np.ndarray, k: int, rerank: int = RERANK) -> tuple[np.ndarray, np.ndarray]:
    """The index's ``rerank`` x k candidates per query, ranked by exact score (score descending,
    ties to the lower row): ([Q, k'] scores, [Q, k'] rows)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, found = index.search(queries, min(rerank * k, matrix.rows))
    query, column = np.nonzero(found >= 0)
    scores, rows = candidate_top_k(queries, matrix, query, found[query, column], k)
    return scores.astype(np.float32), rows


def _caption_recall(store: EmbeddingStore, index, matrix: Matrix, queries: int, rng: np.random.Generator, rerank: int) -> float:
    """Recall@10 of the tuned index for caption (text-to-image) queries."""
    entry = store.complete_part("captions")
    rows = np.sort(rng.choice(entry["rows"], size=min(entry["rows"], queries), replace=False))
    texts = store.matrix("captions").take(rows).astype(np.float32)
    _, exact = exact_top_k(texts, matrix, RECALL_AT)
    _, found = reranked_search(index, matrix, texts, RECALL_AT, rerank)
    return recall_at(found, exact)


def load_index(store: EmbeddingStore) -> tuple[object, int]:
    """The saved index with its tuned nprobe, and its tuned re-ranking factor; refuses one built for
    another image list."""
    faiss = _faiss()
    folder = store.root / INDEX_DIR
    if not (folder / INDEX_FILE).exists():
        raise ShnetError(f"{store.root} has no approximate index; build it with `shnet encode ... -o {store.root} --index`")
    index_record = read_json(folder / INDEX_RECORD, "the index record", f"rebuild it with `shnet encode ... -o {store.root} --index`")
    if index_record["image_list_sha256"] != store.part("images")["image_list_sha256"]:
        raise ShnetError(f"{folder} was built for other images than the store holds now; rebuild it with `shnet encode ... --index`")
    index = faiss.read_index(str(folder / INDEX_FILE))
    faiss.extract_index_ivf(index).nprobe = index_record["nprobe"]
    return index, index_record["rerank"]


def ann_top_k(store: EmbeddingStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index, rerank = load_index(store)
    return reranked_search(index, store.matrix("images"), queries, k, rerank)
