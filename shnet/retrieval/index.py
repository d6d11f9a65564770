"""The approximate index (``shnet encode --index``): PCA, FAISS IVF, 4-bit product-quantised codes
scanned with SIMD (fast-scan), and the best candidates re-ranked exactly from the store's matrix.

The vectors are projected on their first ``PCA_DIMENSIONS`` principal axes (real embeddings keep most
of their energy there; k-means, the coarse quantizer and the code scan get 8x cheaper than in 1024
dimensions), clustered into ``nlist`` lists (k-means on 100 sampled vectors per list, a flat coarse
quantizer), and each kept as one 4-bit code per two projected dimensions. A query scans the codes of
its ``nprobe`` closest lists and takes the ``rerank`` x k best; these are ordered by the store's
projected columns (:func:`shnet.retrieval.topk.approximate_scores`: 127 coordinates per row, read
from the store, far closer to the exact score than the 4-bit codes), and the ``rescore`` x k best of
them are scored exactly from the store's matrix and ranked by :func:`shnet.retrieval.topk.rank`: the
scores it returns are exact, only the candidate set is approximate.

Measured on 1M x 1024 structured vectors (benchmarks/search_speed.py, 2 shared cores): codes of 8 or
4 raw dimensions each (PQ128/PQ256 without PCA) capped recall@10 at 0.93-0.94 whatever nprobe; an
HNSW coarse quantizer capped it at 0.938 even with every list probed (lists its graph search never
reached); an HNSW graph over the PCA128 vectors alone built in 97 s and scanned no faster than the
lists for the same recall, at 768 MB. k-means on 40 vectors per list left the lists so rough that
2000 lists needed nprobe 80 for recall@10 0.96 and 4000 scanned no faster; on 100 per list, 2000
lists need 48-64 and 4000 lists 14-16, which scan in 60% of the time (see :func:`list_count`). PQ32
codes or PCA96 scanned 10-20% faster but needed twice the candidates for the same recall. The 4-bit
codes order candidates so roughly that the true top 10 needs 10 x k of them (5 x k: recall 0.92);
ordered by the projected columns, the best 1.5 x k of those keep their recall (1 x k: 0.92), and
scoring 1.5 x k exactly instead of bounding all 10 x k made a batch 2.5x faster.

``nprobe`` and the two factors are chosen at build time: the smallest power of two whose recall@10
against exact search reaches the target on held-out queries (stored images kept out of training and
out of the index while it is tuned, then added), judged by the lower 97.5% confidence bound of the
mean so that new queries reach it too; then the smallest quarter step up to it from the power below
that reaches it as well (80, 96 or 112 between 64 and 128: each power doubles the codes scanned);
then the fewest candidates (5, 10, 20 or ``RERANK`` x k, every one scored exactly) that reach it at
that nprobe; then the fewest of those scored exactly (1, 1.5, 2 or 3 x k) that reach it too. When
captions were encoded, the recall for caption queries (the real text-to-image queries) is measured
as well. The record keeps every measured point.

faiss is an optional dependency (``pip install -c constraints.txt 'shnet[faiss]'``).
"""

from __future__ import annotations

import concurrent.futures
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
RERANK = 30  # codes scanned keep at most RERANK x k candidates per query
RERANK_STEPS = (5, 10, 20)  # fewer tried at the tuned nprobe: each candidate is gathered and scored
RESCORE_STEPS = (1.0, 1.5, 2.0, 3.0)  # x k of each query's candidates scored exactly, best approximated first
PCA_DIMENSIONS = 128
_TRAIN_POINTS_PER_LIST = 100  # k-means training vectors per list (40 left the lists rough: see the module's notes)
_KMEANS_ITERATIONS = 10
_MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
_MIN_PIECE_QUERIES = 16  # a batch is searched in pieces of at least this many queries, one per core
_MAX_TRAIN = 400_000  # k-means and the codebooks learn from at most this many vectors
_PCA_TRAIN = 50_000  # the principal axes from at most this many of them
_TRAIN_STEP = 65_536  # training vectors projected at a time


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ShnetError("the approximate index needs faiss: pip install -c constraints.txt 'shnet[faiss]' (or faiss-cpu)") from None
    return faiss


def list_count(rows: int) -> int:
    """4 sqrt(N) lists (4000 for a million vectors), fewer when there are too few vectors to train
    them. Measured at 1M x 1024 on 2 cores, k-means in 128 dimensions on 100 vectors per list: 4000
    lists reach recall@10 0.96 probing 14-16 of them (FAISS 8 ms per 100 queries, one thread) and
    build in about a minute; 2000 lists needed 64 (13 ms)."""
    return max(1, min(round(4 * math.sqrt(rows)), rows // _MIN_POINTS_PER_LIST))


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
    held_out = matrix.take(query_rows).astype(np.float32)

    kind = index_type(n, dim)
    index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = _KMEANS_ITERATIONS
    ivf.cp.seed = seed
    log(f"index {kind}: training on {train_size} of {n} vectors")
    _train(faiss, index, matrix, train_rows)
    for chunk in matrix.chunks(65536):
        rows = np.arange(chunk.start, chunk.start + len(chunk.embeddings))
        keep = ~np.isin(rows, query_rows, assume_unique=True)
        index.add_with_ids(np.ascontiguousarray(chunk.embeddings[keep], dtype=np.float32), rows[keep])
    build_seconds = time.perf_counter() - started

    log(f"index: tuning nprobe for recall@{RECALL_AT} >= {target_recall} on {len(held_out)} held-out queries")
    _, exact = exact_top_k(held_out, matrix, RECALL_AT, exclude=query_rows)
    curve: dict[int, float] = {}

    def reaches_with(rerank: int, rescore: int | None, recalls_by: dict, key) -> bool:
        """Whether the index as set reaches the target; its mean recall kept in ``recalls_by[key]``."""
        _, found = reranked_search(index, matrix, held_out, RECALL_AT, rerank, rescore)
        recalls = query_recalls(found, exact)
        recalls_by[key] = float(recalls.mean())
        return lower_bound(recalls) >= target_recall

    def reaches(probe: int) -> bool:
        ivf.nprobe = probe
        return reaches_with(RERANK, None, curve, probe)

    powers = sorted({min(2**p, nlist) for p in range(int(math.log2(nlist)) + 2)})
    nprobe = next((p for p in powers if reaches(p)), None)
    if nprobe is None:  # not even every list: the most there is
        nprobe = nlist
    else:  # a quarter, half or three quarters of the way up from the last power that fell short
        below = max((p for p in curve if p < nprobe), default=0)
        nprobe = next((p for p in sorted({below + (nprobe - below) * j // 4 for j in (1, 2, 3)} - {below, nprobe}) if reaches(p)), nprobe)
    ivf.nprobe = nprobe
    by_rerank = {RERANK: curve[nprobe]}
    rerank = next((r for r in RERANK_STEPS if reaches_with(r, None, by_rerank, r)), RERANK)
    by_rescore: dict[float, float] = {}
    rescore = next((f for f in RESCORE_STEPS if f < rerank and reaches_with(rerank, rescored(f, RECALL_AT), by_rescore, f)), None)
    started = time.perf_counter()
    index.add_with_ids(held_out, query_rows)  # held out for tuning only: the index covers every image
    build_seconds += time.perf_counter() - started
    caption_recall = _caption_recall(store, index, matrix, queries, rng, rerank, rescore) if "captions" in record else None

    folder = store.root / INDEX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    index_record = {
        "type": kind,
        "rerank": rerank,
        "rescore": rescore,
        "metric": "inner_product",
        "vectors": n,
        "dimension": dim,
        "nlist": nlist,
        "nprobe": nprobe,
        "target_recall": target_recall,
        f"recall_at_{RECALL_AT}": by_rescore[rescore] if rescore is not None else by_rerank[rerank],
        "recall_by_nprobe": {str(k): v for k, v in sorted(curve.items())},
        "recall_by_rerank": {str(k): v for k, v in sorted(by_rerank.items())},
        "recall_by_rescore": {str(k): v for k, v in sorted(by_rescore.items())},
        "held_out_queries": len(held_out),
        f"caption_recall_at_{RECALL_AT}": caption_recall,
        "build_seconds": round(build_seconds, 3),
        "image_list_sha256": entry["image_list_sha256"],
    }
    atomic_write_json(folder / INDEX_RECORD, index_record)
    return index_record


def rescored(factor: float | None, k: int) -> int | None:
    """Candidates per query scored exactly for a tuned ``rescore`` factor (None: all of them)."""
    return None if factor is None else math.ceil(factor * k)


def _train(faiss, index, matrix: Matrix, train_rows: np.ndarray) -> None:
    """Train ``index`` (PCA, then the lists and codes on the projected vectors) on ``train_rows``:
    the PCA on at most ``_PCA_TRAIN`` of them, the rest projected ``_TRAIN_STEP`` rows at a time, so
    that 400,000 training vectors of 1024 take 200 MB, not 1.6 GB."""
    pretransform = faiss.downcast_index(index)
    pca = faiss.downcast_VectorTransform(pretransform.chain.at(0))
    pca.train(matrix.take(train_rows[:: max(1, len(train_rows) // _PCA_TRAIN)]).astype(np.float32))
    projected = np.concatenate(
        [pca.apply(matrix.take(train_rows[lo : lo + _TRAIN_STEP]).astype(np.float32)) for lo in range(0, len(train_rows), _TRAIN_STEP)]
    )
    pretransform.index.train(projected)
    pretransform.is_trained = True


def reranked_search(index, matrix: Matrix, queries: np.ndarray, k: int, rerank: int = RERANK, rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The index's ``rerank`` x k candidates per query, the ``rescore`` best of them by approximate
    score (None: all) ranked by exact score (score descending, ties to the lower row): ([Q, k']
    scores, [Q, k'] rows). A batch is cut into one piece per core, each searched by FAISS in one
    thread and re-ranked in its own thread, so that one piece's re-ranking (numpy, mostly one core)
    runs beside another's scan: measured at 1M x 1024, 200 queries took 25 ms instead of 32 ms with
    FAISS's own threads over the whole batch. After FAISS, each query's answer is its own; FAISS's
    arithmetic (BLAS for batches of 20 or more) may round differently with the batch size, which can
    only change a candidate that ties another at the edge of a list or of the ``rerank`` x k."""
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    pieces = max(1, min(faiss.omp_get_max_threads(), len(queries) // _MIN_PIECE_QUERIES))

    def search(piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if pieces > 1:
            faiss.omp_set_num_threads(1)  # this thread's own setting: the pieces are the parallelism
        _, found = index.search(queries[piece], min(rerank * k, matrix.rows))
        return candidate_top_k(queries[piece], matrix, found, k, rescore)

    if pieces == 1:
        scores, rows = search(np.arange(len(queries)))
    else:
        with concurrent.futures.ThreadPoolExecutor(pieces, thread_name_prefix="shnet-ann") as pool:
            answers = list(pool.map(search, np.array_split(np.arange(len(queries)), pieces)))
        width = max(a[1].shape[1] for a in answers)
        scores = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-np.inf) for s, _ in answers])
        rows = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for _, r in answers])
    return scores.astype(np.float32), rows


def _caption_recall(store: EmbeddingStore, index, matrix: Matrix, queries: int, rng: np.random.Generator, rerank: int, rescore: float | None) -> float:
    """Recall@10 of the tuned index for caption (text-to-image) queries."""
    entry = store.complete_part("captions")
    rows = np.sort(rng.choice(entry["rows"], size=min(entry["rows"], queries), replace=False))
    texts = store.matrix("captions").take(rows).astype(np.float32)
    _, exact = exact_top_k(texts, matrix, RECALL_AT)
    _, found = reranked_search(index, matrix, texts, RECALL_AT, rerank, rescored(rescore, RECALL_AT))
    return recall_at(found, exact)


def load_index(store: EmbeddingStore) -> tuple[object, int, float | None]:
    """The saved index with its tuned nprobe, and its tuned candidate and re-scoring factors (an
    index built before re-scoring was tuned: every candidate re-scored); refuses one built for
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
    return index, index_record["rerank"], index_record.get("rescore")


def ann_top_k(store: EmbeddingStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index, rerank, rescore = load_index(store)
    return reranked_search(index, store.matrix("images"), queries, k, rerank, rescored(rescore, k))
