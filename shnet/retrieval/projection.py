"""The low-dimensional screen of exact search: rows projected on a few directions, with a proven
bound on what the projection misses.

A part of a store has one orthonormal-ish basis B [r, D] (the top right-singular vectors of a sample
of its first shard's rows, uncentred). A row x is kept as ``r + 1`` bfloat16 columns: its projection
P = bf16(B x), and last an upper bound rho on the length of what that projection leaves out,
``|x - B^T P|``. For a query q, with c = B q and b an upper bound on ``|q - B^T c|``:

    q.x = c.P + q.(x - B^T P),   |q.(x - B^T P)| <= |c| sigma + b rho,

sigma bounding ``|B (x - B^T P)|`` (the projection's own rounding; one number per shard). So one
bfloat16 product of [bf16(c), b] with [P, rho] gives, per row, an upper bound on q.x and, with its
rho, a lower bound: the exact screen keeps only the rows whose upper bound reaches the k-th best
lower bound. Nothing here assumes B orthonormal or the data low-dimensional (that only decides how
few rows are kept). rho and sigma are computed in float64 from the stored values and the bfloat16
projection actually stored, then rounded upward with a margin far above float64's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bfloat16 import bfloat16_bits, bfloat16_bits_up, bfloat16_values, float32_up

# Projected columns per row, the residual bound included. Measured on the 2 cores: a 200-query
# bfloat16 product over 16,384 rows took the same ~12 ms with 64 or 128 columns (bound by writing the
# scores) and 60 ms with 1024; 128 leaves less out (real embeddings: the demo's 256-d caption
# embeddings keep a residual of 0.023 of their length with 127 directions).
COLUMNS = 128
BASIS_SAMPLE = 20_000  # rows the basis is learnt from (evenly spaced over the first shard)
_ROWS_PER_STEP = 8192
_SLACK = 2.0**-32  # relative margin on computed float64 norms (float64 errors are ~2^-40 here)


def rank_for(dimension: int) -> int:
    """Basis directions for embeddings of ``dimension``: ``COLUMNS - 1``, or every dimension."""
    return min(COLUMNS - 1, dimension)


def basis_of(rows: np.ndarray) -> np.ndarray:
    """float32 [r, D]: the top right-singular vectors of (a sample of) ``rows``, uncentred; any
    directions the rows do not span filled with orthonormal others."""
    rows = np.asarray(rows)
    dimension = rows.shape[1]
    sample = rows[np.linspace(0, len(rows) - 1, min(len(rows), BASIS_SAMPLE)).astype(np.int64)] if len(rows) else rows
    x = np.asarray(sample, dtype=np.float64)
    values, vectors = np.linalg.eigh(x.T @ x)
    order = np.argsort(-values, kind="stable")[: rank_for(dimension)]
    return np.ascontiguousarray(vectors[:, order].T, dtype=np.float32)


@dataclass
class Projected:
    """One block's projected columns (uint16 bfloat16 bits [rows, r + 1], the residual bound last),
    ``sigma`` (bound on |B (x - B^T P)| over its rows) and ``max_norm`` (of its column rows)."""

    columns: np.ndarray
    sigma: float
    max_norm: float


def project(rows: np.ndarray, basis: np.ndarray) -> Projected:
    """``rows`` [N, D] (their stored values) on ``basis`` [r, D]."""
    rows = np.asarray(rows)
    rank = len(basis)
    columns = np.empty((len(rows), rank + 1), dtype="<u2")
    b32, b64 = np.asarray(basis, np.float32), np.asarray(basis, np.float64)
    sigma = max_norm = 0.0
    for lo in range(0, len(rows), _ROWS_PER_STEP):
        x64 = np.asarray(rows[lo : lo + _ROWS_PER_STEP], dtype=np.float64)
        bits = bfloat16_bits(x64.astype(np.float32) @ b32.T)
        p64 = bfloat16_values(bits).astype(np.float64)
        residual = x64 - p64 @ b64
        scale = _SLACK * (np.linalg.norm(x64, axis=1) + np.linalg.norm(p64, axis=1))
        rho = np.linalg.norm(residual, axis=1) * (1 + _SLACK) + scale
        columns[lo : lo + len(x64), :rank] = bits
        columns[lo : lo + len(x64), rank] = bfloat16_bits_up(rho)
        inside = np.linalg.norm(residual @ b64.T, axis=1) * (1 + _SLACK) + scale
        stored = bfloat16_values(columns[lo : lo + len(x64)]).astype(np.float64)
        sigma = max(sigma, float(inside.max()))
        max_norm = max(max_norm, float((np.linalg.norm(stored, axis=1) * (1 + _SLACK)).max()))
    return Projected(columns, float(float32_up(sigma)), float(float32_up(max_norm)))


@dataclass
class QuerySide:
    """What the projected screen needs of the queries: ``screen`` (float32 [Q, r + 1]: bf16(c) and
    b, both exact in bfloat16), ``spread`` (float64 [Q]: |[c, b]|, times the product's error bound
    and a block's max_norm) and ``reach`` (|c|, times a block's sigma) and ``residual`` (b)."""

    screen: np.ndarray
    spread: np.ndarray
    reach: np.ndarray
    residual: np.ndarray


def query_side(queries: np.ndarray, basis: np.ndarray) -> QuerySide:
    """The queries [Q, D] (float32) against ``basis``."""
    q64 = np.asarray(queries, dtype=np.float64)
    b64 = np.asarray(basis, dtype=np.float64)
    c = q64 @ b64.T
    outside = np.linalg.norm(q64 - c @ b64, axis=1) * (1 + _SLACK) + _SLACK * np.linalg.norm(q64, axis=1)
    b = bfloat16_values(bfloat16_bits_up(outside)).astype(np.float64)
    screen = np.concatenate([bfloat16_values(bfloat16_bits(c)), b[:, None].astype(np.float32)], axis=1)
    reach = np.linalg.norm(c, axis=1) * (1 + _SLACK)
    return QuerySide(screen, np.sqrt(reach**2 + b**2) * (1 + _SLACK), reach, b)
