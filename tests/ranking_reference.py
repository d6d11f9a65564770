"""Retrieval figures computed the plain way, independently of ``shnet.trainer.metrics``: R@K by sorting
each row and column of a similarity matrix (as the VSE/SCAN evaluation code does), and the R@K of a
random ranking counted with binomial coefficients. Tests compare what a run reports with these."""

from __future__ import annotations

from math import comb

import numpy as np

CAPTIONS_PER_IMAGE = 5
RECALL_AT = (1, 5, 10)


def sorted_recalls(sims: np.ndarray) -> dict[str, dict[str, float]]:
    """``{"i2t": {"r1", "r5", "r10"}, "t2i": {...}}`` in percent, from ``sims`` [images, 5 * images]
    (image i owns captions 5i..5i+4), by sorting; ties must not occur (they are refused here)."""
    n_images, n_captions = sims.shape
    assert n_captions == CAPTIONS_PER_IMAGE * n_images
    assert all(len(np.unique(row)) == n_captions for row in sims), "tied similarities: sorting would pick an order"
    i2t = []
    for image in range(n_images):
        order = np.argsort(-sims[image])
        own = np.arange(CAPTIONS_PER_IMAGE * image, CAPTIONS_PER_IMAGE * (image + 1))
        i2t.append(np.flatnonzero(np.isin(order, own)).min())
    t2i = [np.flatnonzero(np.argsort(-sims[:, caption]) == caption // CAPTIONS_PER_IMAGE)[0] for caption in range(n_captions)]
    return {
        name: {f"r{k}": 100.0 * float(np.mean(np.asarray(ranks) < k)) for k in RECALL_AT}
        for name, ranks in (("i2t", i2t), ("t2i", t2i))
    }


def random_ranking_rsum(n_images: int) -> float:
    """The expected rSum of a random ranking of ``n_images`` images and their 5 captions each."""
    n_captions = CAPTIONS_PER_IMAGE * n_images
    total = 0.0
    for k in RECALL_AT:
        # image to text: some of the image's 5 captions among the first k of all captions
        total += 100.0 * (1.0 - comb(n_captions - CAPTIONS_PER_IMAGE, k) / comb(n_captions, k))
        # text to image: the caption's image among the first k images
        total += 100.0 * min(k, n_images) / n_images
    return total
