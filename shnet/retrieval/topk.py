"""Exact top-k by inner product over a matrix held in row blocks, and the one ranking rule
(score descending, ties to the lower row) that exact and approximate search share.

Two passes, so that the answer never depends on how the rows are cut into chunks, on which queries
share a batch, or on which screen a query took:

1. the screen bounds every row's score from above and below and keeps, per query, the rows whose
   upper bound reaches the k-th best lower bound seen so far (so no row of the true top-k, ties
   included, is dropped). Two screens give the bounds, chunk by chunk:

   - the projected screen (:mod:`shnet.retrieval.projection`): one bfloat16 product of the queries
     with the rows' ``r + 1`` stored projected columns, 8x fewer operations than the full dimension
     at D = 1024. Its bound is tight where the rows lie near a low-dimensional subspace, as
     embeddings do;
   - the full screen: the rows' stored bfloat16 copy times the bfloat16 queries (error at most
     ``screen_error(D) |q| max|x|``). A query whose projected bound keeps more than
     ``FALLBACK_SHARE`` of a chunk's rows (data without low-dimensional structure), and every query
     on a block stored without projections (a store written before them), is screened so there;
2. the few rows kept are scored again from the stored values in float64 (each product exact, each
   row summed on its own) and ranked by :func:`rank`.

Measured on this project's 2-core machine, the bfloat16 screens read stored bits and need no
conversion (5-10x faster than float16 -> float32 blocks and a float32 product), and at 1M x 1024 the
projected screen answers a batch of 200 queries 3-4x faster than the full one.
Imported by both ``search.py`` and ``index.py``, which do not import each other for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .bfloat16 import bfloat16_bits, bfloat16_bits_up, bfloat16_values, screen_error
from .projection import Projected, basis_of, project, query_side

RESCORE_ROWS = 8192  # candidate rows gathered per step to be scored exactly
_RESCORE_STEP = 256  # rows multiplied in float64 at a time (256 x D float64: in cache)
# Scores per screen product (16 MiB of bfloat16): rows per product = this / queries, at least
# MIN_CHUNK_ROWS. Measured on the busy 2 cores, each product costs milliseconds of thread start-up:
# one query over 1M rows took 0.46-0.84 s in products of 16,384 rows, 0.15-0.17 s in 100,000;
# 200 queries 1.9-2.7 s in 16,384 rows, 1.7 s in 32,768-65,536.
SCORES_PER_PRODUCT = 1 << 23
MIN_CHUNK_ROWS = 1024
FALLBACK_SHARE = 1 / 64  # a query whose projected bound keeps more of a chunk: the full screen there
_SAMPLE_STRIDE = 16  # the kept share is estimated on every 16th row of a chunk
_SLACK = 2.0**-30  # per unit of |q| max|x|: far above float64's errors in c = B q and in rescoring


@dataclass
class Chunk:
    """Consecutive rows of a matrix: ``start`` is the global row of ``embeddings[0]``."""

    start: int
    embeddings: np.ndarray


class Matrix:
    """Row blocks (arrays or memory-mapped ``.npy`` files) read as one [rows, D] matrix, with their
    ``screens`` (the same rows as :func:`bfloat16_bits`) and ``projected`` columns on one ``basis``
    (per block a :class:`Projected`, or None: that block screened in full dimension only).
    Screens are made when not given, and projections too when neither they nor a basis are given
    (the basis learnt from the first block). ``max_norm`` bounds every row's length (the done
    records keep it; computed when not given)."""

    def __init__(
        self,
        blocks: Sequence[np.ndarray],
        max_norm: float | None = None,
        screens: Sequence[np.ndarray] | None = None,
        projected: Sequence[Projected | None] | None = None,
        basis: np.ndarray | None = None,
    ):
        self.blocks = list(blocks)
        self.screens = list(screens) if screens is not None else [bfloat16_bits(b) for b in self.blocks]
        self.starts = np.concatenate([[0], np.cumsum([len(b) for b in self.blocks])]).astype(np.int64)
        self.rows = int(self.starts[-1])
        self.dimension = int(self.blocks[0].shape[1]) if self.blocks else 0
        if max_norm is None:
            max_norm = max((float(np.linalg.norm(np.asarray(b, np.float64), axis=1).max()) for b in self.blocks if len(b)), default=0.0)
        self.max_norm = float(max_norm)
        if projected is None and basis is None and self.rows:
            basis = basis_of(next(b for b in self.blocks if len(b)))
            projected = [project(b, basis) for b in self.blocks]
        self.basis = basis
        self.projected = list(projected) if projected is not None else [None] * len(self.blocks)
        if basis is None and any(p is not None for p in self.projected):
            raise ValueError("projected blocks need their basis")

    def chunks(self, rows: int, screens: bool = False) -> Iterator[Chunk]:
        """The rows in order (their ``screens`` instead: bfloat16 bits), at most ``rows`` at a time
        (views: nothing copied)."""
        for block, lo, hi in self.pieces(rows):
            yield Chunk(int(self.starts[block] + lo), (self.screens if screens else self.blocks)[block][lo:hi])

    def pieces(self, rows: int) -> Iterator[tuple[int, int, int]]:
        """(block, first row, end row) of every chunk of at most ``rows`` rows, in order."""
        rows = max(1, int(rows))
        for block, values in enumerate(self.blocks):
            for lo in range(0, len(values), rows):
                yield block, lo, min(lo + rows, len(values))

    def take(self, rows: np.ndarray, screens: bool = False) -> np.ndarray:
        """The given global rows (any order, repeats allowed), in their stored dtype (their
        ``screens`` instead: bfloat16 bits)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows outside 0..{self.rows - 1}")
        source = self.screens if screens else self.blocks
        out = np.empty((len(rows), self.dimension), dtype=source[0].dtype if source else np.float32)
        order = np.argsort(rows, kind="stable")  # read in row order, block by block
        block_of = np.searchsorted(self.starts, rows, side="right") - 1
        for at in _by_block(order, block_of):
            block = block_of[at[0]]
            out[at] = source[block][rows[at] - self.starts[block]]
        return out


def _by_block(at: np.ndarray, block_of: np.ndarray) -> list[np.ndarray]:
    """``at`` (positions) cut into runs of one block each, positions in each run in the order given
    (``at`` already in block order, e.g. by row, takes one pass)."""
    if len(at) and (np.diff(block_of[at]) < 0).any():
        at = at[np.argsort(block_of[at], kind="stable")]
    return np.split(at, np.flatnonzero(np.diff(block_of[at])) + 1) if len(at) else []


def rank(query: np.ndarray, scores: np.ndarray, rows: np.ndarray, queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, its ``k`` best (score, row) pairs among flat candidates (``query[i]`` names the
    query of candidate i): score descending, ties broken by the lower row. Returns ([Q, k'] scores,
    [Q, k'] rows), k' = min(k, the most candidates any query has); a query with fewer has its
    remaining places filled with row -1 and score -inf."""
    order = np.lexsort((rows, -scores, query))
    scores, rows = scores[order], rows[order]
    counts = np.bincount(query, minlength=queries)
    width = int(min(k, counts.max())) if len(query) else 0
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    at = first[:, None] + np.arange(width)[None, :]
    present = np.arange(width)[None, :] < counts[:, None]
    at = np.where(present, at, 0)
    if not len(rows):
        return np.zeros((queries, 0), scores.dtype), np.zeros((queries, 0), np.int64)
    return np.where(present, scores[at], -np.inf), np.where(present, rows[at], -1)


class _Floor:
    """Per query, a lower bound on its k-th best score: the k-th best lower bound among the rows
    kept so far (every row whose lower bound could count is kept), or a bound given directly."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.query, self.lower = np.zeros(0, np.int64), np.zeros(0, np.float64)
        self.given = np.full(queries, -np.inf)
        self.kth = self.given.copy()

    def raise_to(self, bound: np.ndarray) -> None:
        self.given = np.maximum(self.given, bound)
        self.kth = np.maximum(self.kth, self.given)

    def add(self, query: np.ndarray, lower: np.ndarray) -> None:
        query, lower = np.concatenate([self.query, query]), np.concatenate([self.lower, lower])
        order = np.lexsort((-lower, query))
        query, lower = query[order], lower[order]
        keep = np.arange(len(query)) - np.searchsorted(query, query, side="left") < self.k
        self.query, self.lower = query[keep], lower[keep]
        counts = np.bincount(self.query, minlength=len(self.kth))
        last = np.searchsorted(self.query, np.arange(len(self.kth)), side="right") - 1
        from_rows = np.where(counts >= self.k, self.lower[np.maximum(last, 0)] if len(self.lower) else -np.inf, -np.inf)
        self.kth = np.maximum(self.given, from_rows)


def _float32_down(values: np.ndarray) -> np.ndarray:
    """float64 -> the greatest float32 values not above them (a floor stays a floor)."""
    out = values.astype(np.float32)
    high = out.astype(np.float64) > values
    out[high] = np.nextafter(out[high], np.float32(-np.inf))
    return out


def _projected_lower(screened: np.ndarray, half: np.ndarray, residual: np.ndarray, rho_bits: np.ndarray) -> np.ndarray:
    """Lower bounds from projected scores: the upper bound's ``half`` below, and twice the
    query's residual bound times the row's (see :mod:`shnet.retrieval.projection`)."""
    return screened - half - 2 * residual * bfloat16_values(rho_bits).astype(np.float64)


def _kept(scores, floor: np.ndarray) -> np.ndarray:
    """numpy bool [Q, rows]: which bfloat16 ``scores`` reach their query's ``floor`` (excluded rows,
    at -inf, never). Where every floor is positive, one comparison of the scores' bits as int16 with
    the bits of the least bfloat16 not below the floor (positive bfloat16 values order as their bits;
    negative ones and -inf fall below any positive bits), by numpy: single-threaded, it beats torch's
    threads on a busy machine."""
    import torch

    if len(floor) and (floor > 0).all():
        return scores.view(torch.int16).numpy() >= bfloat16_bits_up(floor).view(np.int16)[:, None]
    mask = scores >= torch.from_numpy(_float32_down(floor))[:, None]
    if not np.isfinite(floor).all():
        mask &= scores > -np.inf
    return mask.numpy()


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of a C-contiguous 2-D bool array's true entries, row by row (numpy's own 2-D
    nonzero is several times slower)."""
    flat = np.flatnonzero(mask)
    return flat // mask.shape[1], flat % mask.shape[1]


def _bfloat16_tensor(bits: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(bits).view(np.int16)).view(torch.bfloat16)


def exact_top_k(
    queries: np.ndarray, matrix: Matrix, k: int, exclude: np.ndarray | None = None, chunk_rows: int | None = None, counts: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``matrix`` with the largest inner product with each query [Q, D], as
    (scores [Q, k'] float32, global rows [Q, k']) best first, k' = min(k, rows); rows in ``exclude``
    are never returned. ``chunk_rows``: rows per screen product (default: ``SCORES_PER_PRODUCT`` /
    queries). The same answer, bit for bit, whatever ``chunk_rows``, whichever queries are
    asked together and whichever screen each query took. ``counts``, when given, receives how the
    work went: (query, chunk) pairs screened ``projected`` and ``full``, and rows ``rescored``."""
    import torch

    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    n_queries = len(q32)
    excluded = np.unique(np.asarray(exclude, dtype=np.int64)) if exclude is not None else np.zeros(0, np.int64)
    q_norm = np.linalg.norm(q32.astype(np.float64), axis=1)
    slack = _SLACK * q_norm * matrix.max_norm
    full_half = screen_error(matrix.dimension) * q_norm * matrix.max_norm * 1.001 + slack
    q_full = torch.from_numpy(q32).bfloat16()
    side = query_side(q32, matrix.basis) if matrix.basis is not None else None
    q_projected = torch.from_numpy(side.screen).bfloat16() if side is not None else None  # exact: bfloat16 values
    floor = _Floor(n_queries, k)
    tally = {"projected": 0, "full": 0, "rescored": 0}
    found_query, found_row, found_upper = [], [], []

    def keep(query: np.ndarray, rows: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> None:
        found_query.append(query)
        found_row.append(rows)
        found_upper.append(upper)
        floor.add(query, lower)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch on a read-only memory map: only read here
        for block, lo, hi in matrix.pieces(chunk_rows or max(MIN_CHUNK_ROWS, SCORES_PER_PRODUCT // max(1, n_queries))):
            start, size = int(matrix.starts[block]) + lo, hi - lo
            first, last = np.searchsorted(excluded, [start, start + size])
            dropped = torch.from_numpy(excluded[first:last] - start)
            full = np.arange(n_queries)
            projected = matrix.projected[block]
            if projected is not None:
                columns = projected.columns[lo:hi]
                scores = q_projected @ _bfloat16_tensor(columns).T  # bfloat16 [Q, size]: upper bounds, less ``half``
                if len(dropped):
                    scores[:, dropped] = -np.inf
                half = screen_error(columns.shape[1]) * side.spread * projected.max_norm * 1.001 + side.reach * projected.sigma + slack
                if size > k and not np.isfinite(floor.kth).all():
                    top, at = scores.float().topk(k, dim=1)
                    query = np.repeat(np.arange(n_queries), k)
                    lower = _projected_lower(top.double().numpy().ravel(), half[query], side.residual[query], columns[at.numpy().ravel(), -1])
                    floor.raise_to(lower.reshape(n_queries, k).min(axis=1))
                mask = _kept(scores, floor.kth - half)
                sample = mask if size <= 64 * _SAMPLE_STRIDE else mask[:, ::_SAMPLE_STRIDE]
                share = np.count_nonzero(sample, axis=1) / sample.shape[1]
                fallback = share * size > FALLBACK_SHARE * size + k  # the top k itself is no reason to fall back
                screened = np.flatnonzero(~fallback)
                if len(screened):
                    row, column = _nonzero(mask if len(screened) == n_queries else mask[screened])
                    query = screened[row]
                    values = scores[torch.from_numpy(query), torch.from_numpy(column)].double().numpy()
                    keep(query, column + start, values + half[query], _projected_lower(values, half[query], side.residual[query], columns[column, -1]))
                full = np.flatnonzero(fallback)
                tally["projected"] += len(screened)
            tally["full"] += len(full)
            if not len(full):
                continue
            bits = _bfloat16_tensor(matrix.screens[block][lo:hi])
            scores = (q_full if len(full) == n_queries else q_full[torch.from_numpy(full)]) @ bits.T
            if len(dropped):
                scores[:, dropped] = -np.inf
            half = full_half[full]
            if size > k and not np.isfinite(floor.kth[full]).all():
                bound = np.full(n_queries, -np.inf)
                bound[full] = scores.float().topk(k, dim=1).values[:, -1].double().numpy() - half
                floor.raise_to(bound)
            row, column = _nonzero(_kept(scores, floor.kth[full] - half))
            values = scores[torch.from_numpy(row), torch.from_numpy(column)].double().numpy()
            keep(full[row], column + start, values + half[row], values - half[row])
    if not found_query:  # no rows at all
        return np.zeros((n_queries, 0), np.float32), np.zeros((n_queries, 0), np.int64)
    query, rows, upper = np.concatenate(found_query), np.concatenate(found_row), np.concatenate(found_upper)
    kept = upper >= floor.kth[query]
    query, rows = _narrowed(matrix, q32, query[kept], rows[kept], upper[kept], floor.kth, k)
    tally["rescored"] = len(rows)
    if counts is not None:
        counts.update(tally)
    scores, rows = rank(query, exact_scores(matrix, q32, query, rows), rows, n_queries, k)
    return scores.astype(np.float32), rows


def _narrowed(matrix: Matrix, queries: np.ndarray, query: np.ndarray, rows: np.ndarray, upper: np.ndarray, kth: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct pairs (upper bounds ``upper``; ``kth``: lower bounds on each query's k-th best
    score) that can still be in their query's top k once bounded by the full screen too: each row's
    stored bfloat16 copy times the float32 query in float32, within ``screen_error(D) |q| max|x|``
    (rounding x, then float32 products and sums) of the exact score."""
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    q_norm = np.linalg.norm(q32.astype(np.float64), axis=1)
    half = screen_error(matrix.dimension) * q_norm * matrix.max_norm * 1.001 + _SLACK * q_norm * matrix.max_norm
    screened = _screened(matrix, rows, q32, query).astype(np.float64)
    floor = _Floor(len(q32), k)
    floor.raise_to(kth)
    floor.add(query, screened - half[query])
    keep = np.minimum(upper, screened + half[query]) >= floor.kth[query]
    return query[keep], rows[keep]


def _screened(matrix: Matrix, rows: np.ndarray, queries: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 products of each row's stored bfloat16 copy with its float32 query,
    ``queries[query[i]]``: the rows gathered once, one matrix-vector product per query."""
    out = np.empty(len(rows), np.float32)
    order = np.lexsort((rows, query))
    values = bfloat16_values(matrix.take(rows[order], screens=True))
    edges = np.concatenate([[0], np.flatnonzero(np.diff(query[order])) + 1, [len(order)]]) if len(order) else [0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[order[lo:hi]] = values[lo:hi] @ queries[query[order[lo]]]
    return out


def exact_scores(matrix: Matrix, queries: np.ndarray, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 inner products of ``queries[query[i]]`` with ``matrix`` row ``rows[i]``: each product
    exact (float16/32 times float32), each row summed on its own (numpy sums every row of a
    C-contiguous [M, D] array pairwise along it, whatever M), so a pair's score is the same bits
    whatever else is scored with it. The rows are gathered in order, ``RESCORE_ROWS`` at a time, and
    multiplied ``_RESCORE_STEP`` at a time (their float64 copies stay in cache: 2.3x faster than whole
    gathers converted at once, measured on 3,000 rows of 1024)."""
    out = np.empty(len(rows), np.float64)
    q64 = np.asarray(queries, dtype=np.float64)
    order = np.argsort(rows, kind="stable")
    for lo in range(0, len(order), RESCORE_ROWS):
        part = order[lo : lo + RESCORE_ROWS]
        gathered = matrix.take(rows[part])
        for at in range(0, len(part), _RESCORE_STEP):
            step = part[at : at + _RESCORE_STEP]
            products = gathered[at : at + _RESCORE_STEP].astype(np.float64)
            products *= q64[query[step]]
            out[step] = products.sum(axis=1)
    return out


def approximate_scores(matrix: Matrix, queries: np.ndarray, found: np.ndarray) -> np.ndarray:
    """float32 [Q, C] approximations of ``queries[q]`` . row ``found[q, c]`` (-inf where ``found`` is
    negative: no candidate): a row's projected columns times the query's coordinates on the basis
    where its block has them (off by what the projection leaves out of both), its bfloat16 screen
    times the query elsewhere. Each one summed on its own: the same bits whatever else is asked."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n_queries, width = found.shape
    flat = found.ravel()
    valid = flat >= 0
    block_of = np.searchsorted(matrix.starts, np.where(valid, flat, 0), side="right") - 1
    projected = np.array([p is not None for p in matrix.projected], bool)[block_of] & valid
    out = np.full(len(flat), -np.inf, np.float32)
    if projected.any():
        dims = len(matrix.basis)
        values = np.zeros((len(flat), dims), np.float32)  # 0.0 for the rows scored otherwise
        high_halves = values.view("<u2").reshape(len(flat), dims, 2)[:, :, 1]  # bfloat16 bits are a float32's upper half
        for at in _by_block(np.flatnonzero(projected), block_of):
            block = block_of[at[0]]
            high_halves[at] = matrix.projected[block].columns[flat[at] - matrix.starts[block], :dims]
        coordinates = np.stack([matrix.basis @ q for q in queries])  # one product per query: its own bits
        scores = np.einsum("qcr,qr->qc", values.reshape(n_queries, width, dims), coordinates).ravel()
        out[projected] = scores[projected]
    screened = np.flatnonzero(valid & ~projected)
    if len(screened):
        values = bfloat16_values(matrix.take(flat[screened], screens=True))
        out[screened] = np.einsum("id,id->i", values, queries[screened // width])
    return out.reshape(n_queries, width)


def candidate_top_k(queries: np.ndarray, matrix: Matrix, found: np.ndarray, k: int, rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidates (``found`` [Q, C]: rows, negative where there is
    none) by exact score, ranked by :func:`rank`. ``rescore``: only each query's ``rescore`` best by
    :func:`approximate_scores` (ties to the lower row) are scored exactly; None: every candidate.
    An index's candidates all lie near the top, so bounds prune few of them (measured: 15% at
    1M x 1024); the projected approximation orders them well enough that 1.5 x k re-scored per query
    keep the recall of all 10 x k (benchmarks/search_speed.py), at a sixth of the gathering."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    found = np.sort(np.asarray(found, dtype=np.int64), axis=1)  # the lower row first among equal scores
    if rescore is not None and rescore < found.shape[1]:
        best = np.argsort(-approximate_scores(matrix, queries, found), axis=1, kind="stable")[:, :rescore]
        found = np.take_along_axis(found, best, axis=1)
    query, column = np.nonzero(found >= 0)
    rows = found[query, column]
    return rank(query, exact_scores(matrix, queries, query, rows), rows, len(queries), k)
