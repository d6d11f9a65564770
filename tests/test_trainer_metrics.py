"""Retrieval metrics against brute-force definitions on small random similarity matrices."""

from __future__ import annotations

import numpy as np
import pytest

from shnet.errors import ShnetError
from shnet.trainer import metrics
from shnet.trainer.metrics import (
    chance_rsum,
    i2t_ranks,
    mean_metrics,
    protocol_metrics,
    rank_summary,
    retrieval_metrics,
    t2i_ranks,
)

CPI = 5


def brute_i2t(sims: np.ndarray) -> np.ndarray:
    """Best own caption's rank: how many other images' captions score at least as high."""
    n = sims.shape[0]
    ranks = []
    for i in range(n):
        others = [c for c in range(sims.shape[1]) if c // CPI != i]
        ranks.append(min(sum(sims[i, c] >= sims[i, j] for c in others) for j in range(i * CPI, i * CPI + CPI)))
    return np.array(ranks)


def brute_t2i(sims: np.ndarray) -> np.ndarray:
    ranks = []
    for c in range(sims.shape[1]):
        owner = c // CPI
        ranks.append(sum(sims[k, c] >= sims[owner, c] for k in range(sims.shape[0]) if k != owner))
    return np.array(ranks)


def reference_style(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The VSE/SCAN evaluation loops (argsort order); equal to ours whenever there are no ties."""
    n = sims.shape[0]
    i2t = np.zeros(n, dtype=int)
    for i in range(n):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in range(CPI * i, CPI * i + CPI))
    t2i = np.zeros(CPI * n, dtype=int)
    for i in range(n):
        for k in range(CPI):
            order = np.argsort(sims[:, CPI * i + k])[::-1]
            t2i[CPI * i + k] = np.where(order == i)[0][0]
    return i2t, t2i


@pytest.mark.parametrize("n", [1, 3, 17])
def test_ranks_match_brute_force_on_random_floats(n):
    rng = np.random.default_rng(n)
    sims = rng.standard_normal((n, CPI * n)).astype(np.float32)
    assert np.array_equal(i2t_ranks(sims), brute_i2t(sims))
    assert np.array_equal(t2i_ranks(sims), brute_t2i(sims))
    ref_i2t, ref_t2i = reference_style(sims)
    assert np.array_equal(i2t_ranks(sims), ref_i2t)
    assert np.array_equal(t2i_ranks(sims), ref_t2i)


def test_ranks_with_ties_count_against_the_match():
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 3, size=(9, CPI * 9)).astype(np.float32)  # many exact ties
    assert np.array_equal(i2t_ranks(sims), brute_i2t(sims))
    assert np.array_equal(t2i_ranks(sims), brute_t2i(sims))
    constant = np.zeros((12, CPI * 12), dtype=np.float32)  # every match ranked last
    assert np.all(i2t_ranks(constant) == CPI * 11) and np.all(t2i_ranks(constant) == 11)
    assert retrieval_metrics(constant)["rsum"] == 0.0


def test_chunked_ranks_equal_unchunked(monkeypatch):
    rng = np.random.default_rng(1)
    sims = rng.standard_normal((23, CPI * 23)).astype(np.float32)
    expected_i2t, expected_t2i = i2t_ranks(sims), t2i_ranks(sims)
    monkeypatch.setattr(metrics, "_CHUNK", 4)
    assert np.array_equal(i2t_ranks(sims), expected_i2t)
    assert np.array_equal(t2i_ranks(sims), expected_t2i)


def test_rank_summary_definitions():
    ranks = np.array([0, 0, 1, 4, 5, 9, 10, 30])
    summary = rank_summary(ranks)
    assert summary["r1"] == pytest.approx(100 * 2 / 8)
    assert summary["r5"] == pytest.approx(100 * 4 / 8)
    assert summary["r10"] == pytest.approx(100 * 6 / 8)
    assert summary["medr"] == np.floor(np.median(ranks)) + 1 == 5.0
    assert summary["meanr"] == pytest.approx(ranks.mean() + 1)


def test_perfect_matrix_and_json_shape():
    sims = np.kron(np.eye(6), np.ones((1, CPI))).astype(np.float32)
    result = retrieval_metrics(sims)
    assert set(result) == {"i2t", "t2i", "rsum"}
    assert set(result["i2t"]) == set(result["t2i"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert result["rsum"] == 600.0 and result["i2t"]["medr"] == 1.0 and result["t2i"]["meanr"] == 1.0


def test_coco_protocol_is_fold_mean_and_full(monkeypatch):
    monkeypatch.setattr(metrics, "COCO_TEST_IMAGES", 50)
    monkeypatch.setattr(metrics, "FOLD_IMAGES", 10)
    rng = np.random.default_rng(2)
    sims = rng.standard_normal((50, CPI * 50)).astype(np.float32) + 0.5 * np.kron(np.eye(50), np.ones((1, CPI)))
    result = protocol_metrics(sims, "coco")
    folds = [retrieval_metrics(sims[10 * f : 10 * f + 10, 50 * f : 50 * f + 50]) for f in range(5)]
    assert [result[f"coco-1k/fold{f}"] for f in range(5)] == folds
    assert result["coco-1k"] == mean_metrics(folds)
    assert result["coco-1k"]["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    assert result["coco-5k"] == retrieval_metrics(sims)
    assert protocol_metrics(sims)["coco-5k"] == result["coco-5k"]  # auto: 5,000 images -> coco


def test_protocol_selection_and_size_checks(monkeypatch):
    sims = np.random.default_rng(3).standard_normal((7, CPI * 7))
    assert list(protocol_metrics(sims)) == ["full"]
    with pytest.raises(ShnetError, match="1000-image test set"):
        protocol_metrics(sims, "f30k")
    monkeypatch.setattr(metrics, "F30K_TEST_IMAGES", 7)
    assert list(protocol_metrics(sims)) == ["f30k-1k"]
    assert list(protocol_metrics(sims, dataset="coco")) == ["full"]
    with pytest.raises(ShnetError, match="5 captions per image"):
        retrieval_metrics(np.zeros((3, 14)))


def test_chance_rsum_matches_simulation():
    n, rng = 20, np.random.default_rng(4)
    simulated = np.mean([retrieval_metrics(rng.standard_normal((n, CPI * n)))["rsum"] for _ in range(300)])
    assert chance_rsum(n) == pytest.approx(simulated, rel=0.05)
