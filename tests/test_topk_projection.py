"""Exact search's projected screen: its bound holds in exact arithmetic on adversarial values, the
answer is the float64 full sort whichever screen each query took, and the store keeps the
projections and the basis vouched for."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest
from vector_stores import write_vector_store

from shnet.retrieval import projection, topk
from shnet.retrieval.bfloat16 import bfloat16_bits, bfloat16_bits_up, bfloat16_values
from shnet.retrieval.projection import basis_of, project, query_side, rank_for
from shnet.retrieval.topk import Matrix, exact_scores, exact_top_k

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _exact_norm_squared(values) -> Fraction:
    return sum((Fraction(float(v)) ** 2 for v in values), Fraction(0))


def _adversarial_rows(rng) -> np.ndarray:
    """float16 rows at the format's edges: the largest values, subnormals, exact zeros, values
    halfway between bfloat16 neighbours, mixed signs, and one row far outside the rest's subspace."""
    rows = rng.standard_normal((40, 8)).astype(np.float16)
    rows[0] = [65504, -65504, 0, 1, 2**-24, -(2**-24), 3, -1]
    rows[1] = 0
    rows[2] = np.float16(1 + 2**-8)  # halfway between two bfloat16 values: rounds to even
    rows[3] = [2**-14, 2**-20, -(2**-17), 7, 1 + 2**-9, 0, 0, 65504]
    rows[4, :4] = 0
    rows[5] = rng.standard_normal(8).astype(np.float16) * 1e4
    return rows


def test_residual_and_rounding_bounds_hold_exactly_on_adversarial_values():
    rng = np.random.default_rng(0)
    rows = _adversarial_rows(rng)
    learnt = basis_of(rows[6:])[:3]  # a basis that misses much of the edge rows
    skewed = (learnt + 1e-3 * rng.standard_normal(learnt.shape)).astype(np.float32)  # not orthonormal
    for basis in (learnt, skewed, basis_of(rows)):
        projected = project(rows, basis)
        rank = len(basis)
        columns = bfloat16_values(projected.columns).astype(np.float64)
        b = [[Fraction(float(v)) for v in line] for line in basis]
        for x, stored in zip(rows, columns):
            p = [Fraction(float(v)) for v in stored[:rank]]
            residual = [Fraction(float(x[j])) - sum(p[i] * b[i][j] for i in range(rank)) for j in range(len(x))]
            assert Fraction(float(stored[rank])) ** 2 >= _exact_norm_squared(residual)
            inside = [sum(b[i][j] * residual[j] for j in range(len(x))) for i in range(rank)]
            assert Fraction(projected.sigma) ** 2 >= sum((v**2 for v in inside), Fraction(0))
            assert Fraction(projected.max_norm) ** 2 >= _exact_norm_squared(stored)
        queries = np.concatenate([rng.standard_normal((5, 8)), rows[:3].astype(np.float64)]).astype(np.float32)
        side = query_side(queries, basis)
        for q, outside, reach in zip(queries, side.residual, side.reach):
            c = [sum(b[i][j] * Fraction(float(q[j])) for j in range(len(q))) for i in range(rank)]
            rest = [Fraction(float(q[j])) - sum(c[i] * b[i][j] for i in range(rank)) for j in range(len(q))]
            assert Fraction(float(outside)) ** 2 >= _exact_norm_squared(rest)
            assert Fraction(float(reach)) ** 2 >= sum((v**2 for v in c), Fraction(0))


def test_rounding_upward_never_lands_below():
    values = np.array([0.0, 1e-40, 1.0, 1 + 2**-9, 1 + 2**-30, 3.14159, 65504.0, 1e30, 2.0**-126 * 1.5])
    up = bfloat16_values(bfloat16_bits_up(values)).astype(np.float64)
    assert (up >= values).all() and (up <= values * (1 + 2**-7) + 1e-38).all()
    assert (bfloat16_values(bfloat16_bits(np.float32([1.0, -2.5]))) == [1.0, -2.5]).all()


def _structured(n, dim, rng, subspace=6, clusters=30):
    basis = np.linalg.qr(rng.standard_normal((dim, subspace)))[0].T
    centres = rng.standard_normal((clusters, subspace))
    points = (centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, subspace))) @ basis
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    points += 0.05 * rng.standard_normal((n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)


def _reference(queries, matrix, k, exclude=()):
    """Full sort in float64: score descending, ties to the lower row, excluded rows left out."""
    scores = queries.astype(np.float64) @ matrix.astype(np.float64).T
    scores[:, list(exclude)] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(matrix)), scores.shape), -scores), axis=1)
    return order[:, : min(k, len(matrix) - len(set(exclude)))]


def test_every_screen_gives_the_full_sort_whatever_the_chunks_and_the_batch(monkeypatch):
    monkeypatch.setattr(projection, "COLUMNS", 17)  # 16 of the 48 dimensions: the bound has work to do
    rng = np.random.default_rng(1)
    dim = 48
    rows = _structured(1200, dim, rng)
    rows[700:760] = rows[100:160]  # exact duplicates: ties at many ranks
    noise = rng.standard_normal((400, dim)).astype(np.float16)  # no low-dimensional structure
    structured, unstructured = Matrix([rows[:500], rows[500:501], rows[501:]]), Matrix([noise[:150], noise[150:]])
    near = rows[rng.integers(0, len(rows), 6)].astype(np.float32) + 0.01 * rng.standard_normal((6, dim)).astype(np.float32)
    away = rng.standard_normal((3, dim)).astype(np.float32)  # queries off the subspace: their bound keeps everything
    cases = [(structured, np.concatenate([near, rows[100:102].astype(np.float32), away]), rows), (unstructured, away, noise)]
    for matrix, queries, values in cases:
        counts = {}
        scores, found = exact_top_k(queries, matrix, 12, chunk_rows=256, counts=counts)
        assert (found == _reference(queries, values, 12)).all()
        expected = queries.astype(np.float64) @ values.astype(np.float64).T
        assert (scores == np.take_along_axis(expected, found, 1).astype(np.float32)).all()
        if matrix is structured:  # the near queries screened projected, the others in full
            assert counts["projected"] >= 8 * 3 and counts["full"] >= 3 * 3 and counts["rescored"] < 0.2 * len(queries) * len(values)
        else:
            assert counts["full"] >= 3 * 2
        for chunk_rows in (29, 100_000):
            other_scores, other = exact_top_k(queries, matrix, 12, chunk_rows=chunk_rows)
            assert (other == found).all() and (other_scores == scores).all()
        for i in range(len(queries)):  # alone: the same bits as in the batch
            alone_scores, alone = exact_top_k(queries[i : i + 1], matrix, 12, chunk_rows=200)
            assert (alone[0] == found[i]).all() and (alone_scores[0] == scores[i]).all()
    monkeypatch.setattr(topk, "FALLBACK_SHARE", 1.0)  # every query projected, however loose its bound
    queries = cases[0][1]
    counts = {}
    assert (exact_top_k(queries, structured, 12, chunk_rows=256, counts=counts)[1] == _reference(queries, rows, 12)).all()
    assert counts["full"] == 0
    excluded = np.array([0, 1, 100, 101, 700, 1199])
    assert (exact_top_k(queries, structured, 12, exclude=excluded, chunk_rows=64)[1] == _reference(queries, rows, 12, excluded)).all()
    assert exact_top_k(queries[:2], Matrix([rows[:5]]), 10)[1].shape == (2, 5)  # k beyond the rows


def test_blocks_without_projections_are_screened_in_full():
    rng = np.random.default_rng(2)
    rows = _structured(600, 32, rng)
    whole = Matrix([rows[:300], rows[300:]])
    mixed = Matrix(whole.blocks, whole.max_norm, whole.screens, [None, whole.projected[1]], whole.basis)
    plain = Matrix(whole.blocks, whole.max_norm, whole.screens, [None, None], None)
    queries = rows[:5].astype(np.float32)
    answers = [exact_top_k(queries, m, 7, chunk_rows=128) for m in (whole, mixed, plain)]
    assert all((a[1] == answers[0][1]).all() and (a[0] == answers[0][0]).all() for a in answers)
    assert (answers[0][1] == _reference(queries, rows, 7)).all()


def test_a_pairs_exact_score_is_the_same_bits_whatever_else_is_scored(monkeypatch):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((300, 100)).astype(np.float16)
    matrix = Matrix([rows[:120], rows[120:]])
    queries = rng.standard_normal((4, 100)).astype(np.float32)
    query, pairs = rng.integers(0, 4, 900), rng.integers(0, 300, 900)
    together = exact_scores(matrix, queries, query, pairs)
    alone = np.array([exact_scores(matrix, queries, query[i : i + 1], pairs[i : i + 1])[0] for i in range(0, 900, 7)])
    assert (together[::7] == alone).all()
    monkeypatch.setattr(topk, "RESCORE_ROWS", 13)
    assert (exact_scores(matrix, queries, query[::-1], pairs[::-1])[::-1] == together).all()
    one_row = np.array([(rows[p].astype(np.float64) * queries[q]).sum() for q, p in zip(query[:50], pairs[:50])])
    assert (together[:50] == one_row).all()


def test_the_store_keeps_projections_and_one_basis_vouched_for(tmp_path):
    rng = np.random.default_rng(4)
    rows = _structured(500, 40, rng)
    store = write_vector_store(tmp_path / "emb", rows, 200)
    basis = np.load(store.basis_path("images"))
    assert basis.shape == (rank_for(40), 40) and basis.dtype == np.float32
    for shard in range(3):
        done = json.loads(store.shard_path("images", shard, "done").read_text())
        assert {f"projections/images/{shard:05d}.npy", "bases/images.npy"} <= set(done["files"]) and done["projection"]["rank"] == len(basis)
        columns = np.load(store.shard_path("images", shard, "projection"))
        assert (columns == project(rows[shard * 200 : (shard + 1) * 200], basis).columns).all()
    # a shard written later (a resumed encode) keeps the basis learnt from the first, whatever its rows
    store.write_shard("images", 2, pa.table({"image_id": ["x"], "path": [""]}), rng.standard_normal((1, 40)).astype(np.float16), "float16")
    assert (np.load(store.basis_path("images")) == basis).all()
    store.write_shard("images", 2, pa.table({"image_id": [f"v{i}" for i in range(400, 500)], "path": [""] * 100}), rows[400:], "float16")

    matrix = store.matrix("images")
    assert all(isinstance(p.columns, np.memmap) for p in matrix.projected) and (matrix.basis == basis).all()
    queries = rows[:4].astype(np.float32)
    assert (exact_top_k(queries, matrix, 5)[1] == _reference(queries, rows, 5)).all()

    projection = store.shard_path("images", 1, "projection")
    projection.write_bytes(projection.read_bytes()[:-2])
    assert str(projection) in store.shard_problem("images", 1) and "re-run the same `shnet encode`" in store.shard_problem("images", 1)
    basis_file = store.basis_path("images")
    other = basis.copy()
    other[0, 0] += 1
    np.save(basis_file, other)  # same size, other content: every shard projected on the old one is redone
    assert all("is not the basis" in store.shard_problem("images", s) for s in (0, 2))


def test_a_shard_written_before_projections_is_searched_in_full(tmp_path):
    rng = np.random.default_rng(5)
    rows = _structured(300, 24, rng)
    store = write_vector_store(tmp_path / "emb", rows, 100)
    done_path = store.shard_path("images", 1, "done")
    done = json.loads(done_path.read_text())
    del done["projection"]
    done["files"] = {k: v for k, v in done["files"].items() if not k.startswith(("projections/", "bases/"))}
    done_path.write_text(json.dumps(done))
    store.shard_path("images", 1, "projection").unlink()
    assert store.done_shards("images") == {0, 1, 2}
    matrix = store.matrix("images")
    assert matrix.projected[1] is None and matrix.projected[0] is not None
    counts = {}
    queries = rows[::50].astype(np.float32)
    assert (exact_top_k(queries, matrix, 8, counts=counts)[1] == _reference(queries, rows, 8)).all()
    assert counts["full"] >= len(queries)


def test_candidates_rank_by_exact_score_and_rescore_the_best_approximated():
    rng = np.random.default_rng(6)
    rows = _structured(900, 64, rng)
    rows[600:650] = rows[:50]  # ties
    whole = Matrix([rows[:400], rows[400:]])
    mixed = Matrix(whole.blocks, whole.max_norm, whole.screens, [whole.projected[0], None], whole.basis)
    queries = np.concatenate([rows[:6].astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)])
    found = np.stack([rng.choice(len(rows), 300, replace=False) for _ in queries])
    found[1, 250:] = -1  # fewer candidates for one query
    query, column = np.nonzero(found >= 0)
    expected = topk.rank(query, exact_scores(whole, queries, query, found[query, column]), found[query, column], len(queries), 10)
    for matrix in (whole, mixed):
        scores, best = topk.candidate_top_k(queries, matrix, found, 10)
        assert (best == expected[1]).all() and (scores == expected[0]).all()
        approximate = topk.approximate_scores(matrix, queries, found)
        exact = np.full(found.shape, -np.inf)
        exact[query, column] = exact_scores(matrix, queries, query, found[query, column])
        assert (approximate[found < 0] == -np.inf).all()
        valid = found >= 0
        assert np.abs(approximate[valid] - exact[valid]).max() < 0.05 * np.abs(exact[valid]).max()
        # only the 15 best approximated of each query are rescored: the top 10 among them, exactly
        scores, best = topk.candidate_top_k(queries, matrix, found, 10, rescore=15)
        for q in range(len(queries)):
            order = np.lexsort((found[q], -approximate[q]))[:15]
            kept = found[q, order][found[q, order] >= 0]
            ranked = [r for r in sorted(kept, key=lambda r: (-exact[q][found[q] == r][0], r))][:10]
            assert list(best[q]) == ranked
            assert (scores[q] == np.array([exact[q][found[q] == r][0] for r in ranked])).all()
        # each query's answer is the same asked alone
        for q in range(len(queries)):
            alone = topk.candidate_top_k(queries[q : q + 1], matrix, found[q : q + 1], 10, rescore=15)
            assert (alone[1][0] == best[q]).all() and (alone[0][0] == scores[q]).all()
            assert (topk.approximate_scores(matrix, queries[q : q + 1], found[q : q + 1])[0] == approximate[q]).all()