"""Retrieval metrics of image-sentence matching from a similarity matrix.

The matrix is [n_images, captions_per_image * n_images] with each image's captions consecutive
(image i owns captions ``i*cpi .. i*cpi+cpi-1``), the layout of the standard precomputed test sets.

Ranks are 0-based. Image-to-text ranks an image by its best-placed caption: the number of other
images' captions scoring at least as high as its best own caption. Text-to-image ranks a caption by
the number of other images scoring at least as high as its own image. A tie therefore counts
against the match: a constant similarity matrix ranks every match last, never first (the
reference's argsort breaks ties by sort order; without exact ties both give the same ranks).

R@K is the percentage of ranks below K; medr = floor(median rank) + 1 and meanr = mean rank + 1, as
the VSE/SCAN evaluation code reports them; rsum is the sum of the six recalls.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import ShnetError

CAPTIONS_PER_IMAGE = 5
RECALL_AT = (1, 5, 10)
COCO_TEST_IMAGES = 5000
F30K_TEST_IMAGES = 1000
FOLD_IMAGES = 1000
PROTOCOLS = ("auto", "coco", "f30k", "full")

# Rows (or columns) compared at once: bounds the temporary boolean block to ~chunk * n_other bytes.
_CHUNK = 512


def check_similarity_shape(sims: np.ndarray, captions_per_image: int = CAPTIONS_PER_IMAGE) -> int:
    """Validate a [n_images, cpi * n_images] matrix; return n_images."""
    if sims.ndim != 2:
        raise ShnetError(f"a similarity matrix must be 2-D (images x captions), got shape {sims.shape}")
    n_images, n_captions = sims.shape
    if n_images == 0 or n_captions != captions_per_image * n_images:
        raise ShnetError(
            f"a similarity matrix must be images x captions with {captions_per_image} captions per image "
            f"(each image's captions consecutive); got shape {sims.shape}"
        )
    return n_images


def i2t_ranks(sims: np.ndarray, captions_per_image: int = CAPTIONS_PER_IMAGE) -> np.ndarray:
    """Per image: how many other images' captions score >= its best own caption."""
    n_images = check_similarity_shape(sims, captions_per_image)
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, _CHUNK):
        stop = min(start + _CHUNK, n_images)
        block = sims[start:stop]
        own_columns = np.arange(start, stop)[:, None] * captions_per_image + np.arange(captions_per_image)
        own = np.take_along_axis(block, own_columns, axis=1)
        best = own.max(axis=1)
        at_least_best = (block >= best[:, None]).sum(axis=1)
        ranks[start:stop] = at_least_best - (own >= best[:, None]).sum(axis=1)
    return ranks


def t2i_ranks(sims: np.ndarray, captions_per_image: int = CAPTIONS_PER_IMAGE) -> np.ndarray:
    """Per caption: how many other images score >= its own image."""
    check_similarity_shape(sims, captions_per_image)
    n_captions = sims.shape[1]
    ranks = np.empty(n_captions, dtype=np.int64)
    for start in range(0, n_captions, _CHUNK):
        stop = min(start + _CHUNK, n_captions)
        block = sims[:, start:stop]
        captions = np.arange(start, stop)
        own = block[captions // captions_per_image, captions - start]
        ranks[start:stop] = (block >= own[None, :]).sum(axis=0) - 1
    return ranks


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    summary = {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_AT}
    summary["medr"] = float(np.floor(np.median(ranks)) + 1)
    summary["meanr"] = float(np.mean(ranks) + 1)
    return summary


def retrieval_metrics(sims: np.ndarray, captions_per_image: int = CAPTIONS_PER_IMAGE) -> dict:
    """``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum": float}`` of one matrix."""
    i2t = rank_summary(i2t_ranks(sims, captions_per_image))
    t2i = rank_summary(t2i_ranks(sims, captions_per_image))
    rsum = sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in RECALL_AT)
    return {"i2t": i2t, "t2i": t2i, "rsum": float(rsum)}


def mean_metrics(results: list[dict]) -> dict:
    """Field-wise mean of several :func:`retrieval_metrics` results (the COCO 1K 5-fold figure)."""
    return {
        "i2t": {key: float(np.mean([r["i2t"][key] for r in results])) for key in results[0]["i2t"]},
        "t2i": {key: float(np.mean([r["t2i"][key] for r in results])) for key in results[0]["t2i"]},
        "rsum": float(np.mean([r["rsum"] for r in results])),
    }


def fold_blocks(sims: np.ndarray, fold_images: int, captions_per_image: int = CAPTIONS_PER_IMAGE) -> Iterator[np.ndarray]:
    """The diagonal blocks of consecutive ``fold_images`` images and their captions (views)."""
    n_images = check_similarity_shape(sims, captions_per_image)
    for start in range(0, n_images, fold_images):
        stop = start + fold_images
        yield sims[start:stop, start * captions_per_image : stop * captions_per_image]


def resolve_protocol(protocol: str, n_images: int, dataset: str | None = None) -> str:
    """Pick the protocol for ``auto`` (from the Karpathy dataset name, else the image count) and check sizes."""
    if protocol not in PROTOCOLS:
        raise ShnetError(f"unknown protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "auto":
        if dataset == "coco" and n_images == COCO_TEST_IMAGES:
            protocol = "coco"
        elif dataset in ("flickr30k", "f30k") and n_images == F30K_TEST_IMAGES:
            protocol = "f30k"
        elif dataset is None and n_images == COCO_TEST_IMAGES:
            protocol = "coco"
        elif dataset is None and n_images == F30K_TEST_IMAGES:
            protocol = "f30k"
        else:
            protocol = "full"
    expected = {"coco": COCO_TEST_IMAGES, "f30k": F30K_TEST_IMAGES}.get(protocol)
    if expected is not None and n_images != expected:
        raise ShnetError(
            f"the {protocol} protocol needs its {expected}-image test set; this split has {n_images} images "
            "(use --protocol full to evaluate the split as it is)"
        )
    return protocol


def protocol_metrics(sims: np.ndarray, protocol: str = "auto", dataset: str | None = None) -> dict[str, dict]:
    """Every figure of a protocol, keyed by name: ``coco-1k`` (5-fold mean), ``coco-1k/fold0``..4 and
    ``coco-5k``; ``f30k-1k``; or ``full`` (the whole split at once)."""
    protocol = resolve_protocol(protocol, check_similarity_shape(sims), dataset)
    if protocol == "coco":
        folds = [retrieval_metrics(block) for block in fold_blocks(sims, FOLD_IMAGES)]
        results = {"coco-1k": mean_metrics(folds)}
        results.update({f"coco-1k/fold{i}": fold for i, fold in enumerate(folds)})
        results["coco-5k"] = retrieval_metrics(sims)
        return results
    if protocol == "f30k":
        return {"f30k-1k": retrieval_metrics(sims)}
    return {"full": retrieval_metrics(sims)}


def chance_rsum(n_images: int, captions_per_image: int = CAPTIONS_PER_IMAGE) -> float:
    """Expected rsum of a random ranking (no ties): what a model that learned nothing scores."""
    n_captions = captions_per_image * n_images
    total = 0.0
    for k in RECALL_AT:
        # i2t: the best of cpi own captions among n_captions lands in the top k.
        miss = 1.0
        for j in range(captions_per_image):
            miss *= max(0, n_captions - k - j) / (n_captions - j)
        total += 100.0 * (1.0 - miss)
        total += 100.0 * min(k, n_images) / n_images
    return total
