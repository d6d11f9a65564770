"""Exact top-k by inner product over a matrix held in row blocks, and the one ranking rule
(score descending, ties to the lower row) that exact and approximate search share.

Two passes, so that the answer never depends on how the rows are cut into chunks or on which
queries share a batch:

1. the screen: every chunk's bfloat16 copy (stored beside the matrix, so nothing is converted at
   query time) multiplied by the bfloat16 queries, one matrix product per chunk. Per query it keeps
   the rows whose screened score lies within twice the screen's error bound of its running k-th best
   (rounding q and x to bfloat16, float32 accumulation, the bfloat16 result: at most
   ``(3 u + 4 u^2 + 2 D 2^-24) |q| max|x|`` with u = 2^-8), so no row of the true top-k is dropped;
2. the few rows kept are scored again from the stored values in float64, each row on its own, and
   ranked by :func:`rank`.

Measured on this project's 2-core machine, the bfloat16 screen reads half the bytes of a float32
one and needs no conversion: 5-10x faster than float16 -> float32 blocks and a float32 product.
Imported by both ``search.py`` and ``index.py``, which do not import each other for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

_BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, round to nearest)
RESCORE_ROWS = 8192  # candidate rows scored exactly per step (8192 x D float64 at most in memory)
CHUNK_ROWS = 16384  # screen rows per matrix product (32 MiB of bfloat16 at D = 1024)


def screen_error(dimension: int) -> float:
    """The screen's error bound per unit of |q| max|x| (see the module docstring); float32
    accumulation's D 2^-24 doubled for margin."""
    return 3 * _BF16_UNIT + 4 * _BF16_UNIT**2 + 2 * dimension * 2.0**-24


def bfloat16_bits(matrix: np.ndarray) -> np.ndarray:
    """[N, D] floats -> their bfloat16 values (round to nearest even) as little-endian uint16 bits."""
    import torch

    values = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).bfloat16()
    return values.view(torch.int16).numpy().view("<u2")


@dataclass
class Chunk:
    """Consecutive rows of a matrix: ``start`` is the global row of ``embeddings[0]``."""

    start: int
    embeddings: np.ndarray


class Matrix:
    """Row blocks (arrays or memory-mapped ``.npy`` files) read as one [rows, D] matrix, with their
    ``screens`` (the same rows as :func:`bfloat16_bits`; made when not given). ``max_norm`` bounds
    every row's length (the done records keep it; computed when not given)."""

    def __init__(self, blocks: Sequence[np.ndarray], max_norm: float | None = None, screens: Sequence[np.ndarray] | None = None):
        self.blocks = list(blocks)
        self.screens = list(screens) if screens is not None else [bfloat16_bits(b) for b in self.blocks]
        self.starts = np.concatenate([[0], np.cumsum([len(b) for b in self.blocks])]).astype(np.int64)
        self.rows = int(self.starts[-1])
        self.dimension = int(self.blocks[0].shape[1]) if self.blocks else 0
        if max_norm is None:
            max_norm = max((float(np.linalg.norm(np.asarray(b, np.float64), axis=1).max()) for b in self.blocks if len(b)), default=0.0)
        self.max_norm = float(max_norm)

    def chunks(self, rows: int, screens: bool = False) -> Iterator[Chunk]:
        """The rows in order (their ``screens`` instead: bfloat16 bits), at most ``rows`` at a time
        (views: nothing copied)."""
        rows = max(1, int(rows))
        for start, block in zip(self.starts, self.screens if screens else self.blocks):
            for lo in range(0, len(block), rows):
                yield Chunk(int(start + lo), block[lo : lo + rows])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given global rows (any order, repeats allowed), in their stored dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows outside 0..{self.rows - 1}")
        dtype = self.blocks[0].dtype if self.blocks else np.float32
        out = np.empty((len(rows), self.dimension), dtype=dtype)
        block_of = np.searchsorted(self.starts, rows, side="right") - 1
        for b in np.unique(block_of):
            at = np.flatnonzero(block_of == b)
            local = rows[at] - self.starts[b]
            order = np.argsort(local, kind="stable")
            out[at[order]] = self.blocks[b][local[order]]
        return out


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


def _group_best(query: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values per query (flat in, flat out)."""
    order = np.lexsort((-values, query))
    query, values = query[order], values[order]
    starts = np.searchsorted(query, query, side="left")
    keep = np.arange(len(query)) - starts < k
    return query[keep], values[keep]


def exact_top_k(queries: np.ndarray, matrix: Matrix, k: int, exclude: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``matrix`` with the largest inner product with each query [Q, D], as
    (scores [Q, k'] float32, global rows [Q, k']) best first, k' = min(k, rows); rows in ``exclude``
    are never returned. The same answer, bit for bit, whatever ``chunk_rows`` and whichever queries
    are asked together."""
    import torch

    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    n_queries = len(q32)
    excluded = np.unique(np.asarray(exclude, dtype=np.int64)) if exclude is not None else np.zeros(0, np.int64)
    margin = 2 * screen_error(matrix.dimension) * np.linalg.norm(q32.astype(np.float64), axis=1) * matrix.max_norm * 1.001
    q_screen = torch.from_numpy(q32).bfloat16()
    kth = np.full(n_queries, -np.inf)
    best_query, best_value = np.zeros(0, np.int64), np.zeros(0, np.float32)
    kept_query, kept_row, kept_value = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch on a read-only memory map: only read here
        for chunk in matrix.chunks(chunk_rows, screens=True):
            size = len(chunk.embeddings)
            block = torch.from_numpy(np.asarray(chunk.embeddings).view(np.int16)).view(torch.bfloat16)
            scores = q_screen @ block.T  # bfloat16 [Q, size]
            lo, hi = np.searchsorted(excluded, [chunk.start, chunk.start + size])
            if hi > lo:
                scores[:, torch.from_numpy(excluded[lo:hi] - chunk.start)] = -np.inf
            if size > k and not np.isfinite(kth).all():
                kth = np.maximum(kth, scores.float().topk(k, dim=1).values[:, -1].double().numpy())
            floor = torch.from_numpy(kth - margin).float()
            mask = scores >= floor[:, None]
            if not torch.isfinite(floor).all():
                mask &= scores > -np.inf
            row, column = torch.nonzero(mask, as_tuple=True)
            if not len(row):
                continue
            query, values = row.numpy(), scores[row, column].float().numpy()
            kept_query.append(query)
            kept_row.append(column.numpy() + chunk.start)
            kept_value.append(values)
            best_query, best_value = _group_best(np.concatenate([best_query, query]), np.concatenate([best_value, values]), k)
            full = np.bincount(best_query, minlength=n_queries) >= k
            if full.any():
                last = np.searchsorted(best_query, np.arange(n_queries), side="right") - 1
                kth = np.where(full, best_value[np.maximum(last, 0)], -np.inf)
    if not kept_query:  # no rows at all
        return np.zeros((n_queries, 0), np.float32), np.zeros((n_queries, 0), np.int64)
    query, rows, values = np.concatenate(kept_query), np.concatenate(kept_row), np.concatenate(kept_value)
    keep = values >= (kth - margin)[query]
    query, rows = query[keep], rows[keep]
    scores, rows = rank(query, exact_scores(matrix, q32, query, rows), rows, n_queries, k)
    return scores.astype(np.float32), rows


def exact_scores(matrix: Matrix, queries: np.ndarray, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float64 inner products of ``queries[query[i]]`` with ``matrix`` row ``rows[i]``: each product
    exact (float16/32 times float32), summed pairwise along one row, so a pair's score is the same
    bits whatever else is scored with it."""
    out = np.empty(len(rows), np.float64)
    q64 = np.asarray(queries, dtype=np.float64)
    order = np.lexsort((rows, query))
    bounds = np.flatnonzero(np.diff(query[order])) + 1
    for group in np.split(order, bounds) if len(order) else []:
        for lo in range(0, len(group), RESCORE_ROWS):
            part = group[lo : lo + RESCORE_ROWS]
            out[part] = (matrix.take(rows[part]).astype(np.float64) * q64[query[part[0]]]).sum(axis=1)
    return out
