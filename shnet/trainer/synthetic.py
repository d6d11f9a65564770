"""A small learnable captioned feature cache: tests, benchmarks and smoke runs without images.

Every image shows a few "concepts" out of a fixed vocabulary. Its region features (or grid cells)
are noisy copies of the concepts' prototype vectors, its layout marks the concepts' panoptic
classes in vertical stripes, and its captions name the concepts in random order and templates, so
a model can learn the match and validation recall rises far above chance.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from ..cache import schema, write_stage
from ..cache.schema import NUM_CLASSES, SEG_CELLS, SEG_MAP_SIZE

CONCEPT_WORDS = (
    "dog",
    "cat",
    "horse",
    "bicycle",
    "tree",
    "boat",
    "pizza",
    "clock",
    "umbrella",
    "train",
    "kite",
    "bench",
    "river",
    "snow",
    "bridge",
    "guitar",
)
OPENINGS = ("a photo of", "there is", "a picture showing", "in this image we see", "a view with")
CONNECTORS = (" and ", " with ", " next to ", ", ")
CAPTIONS_PER_IMAGE = 5


def concept_sets(num_images: int, num_concepts: int, per_image: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Distinct concept combinations (as long as there are enough), shuffled."""
    combos = list(itertools.combinations(range(num_concepts), per_image))
    order = rng.permutation(len(combos))
    return [combos[order[i % len(combos)]] for i in range(num_images)]


def write_concept_cache(
    root: str | Path,
    splits: dict[str, int],
    feature_dim: int = schema.REGION_FEATURE_DIM,
    num_boxes: int = 12,
    num_concepts: int = 12,
    concepts_per_image: int = 3,
    grid_size: int = 0,
    noise: float = 0.6,
    shard_size: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Write stages ``regions`` and ``layout`` (and ``grid`` when ``grid_size`` > 0) for
    ``sum(splits.values())`` images into the cache ``root``; return the captions table
    (image_id, caption, split), 5 captions per image."""
    rng = np.random.default_rng(seed)
    n = sum(splits.values())
    image_ids = [f"img{i:05d}" for i in range(n)]
    concepts = concept_sets(n, num_concepts, concepts_per_image, rng)
    prototypes = rng.standard_normal((num_concepts, feature_dim)).astype(np.float32)
    classes = rng.choice(NUM_CLASSES, size=num_concepts, replace=False)

    counts = rng.integers(max(1, num_boxes // 2), num_boxes + 1, size=n)
    regions = schema.filled(schema.REGIONS, n, (schema.FEATURES, schema.BOXES, schema.NUM_BOXES), K=num_boxes, D=feature_dim)
    regions[schema.NUM_BOXES][:] = counts
    layout = schema.filled(schema.LAYOUT, n, schema.LAYOUT_INPUTS)
    seg_map, seg_feat, cat_onehot = (layout[name] for name in (schema.SEG_MAP, schema.SEG_FEAT, schema.CAT_ONEHOT))
    for i, present in enumerate(concepts):
        owners = rng.choice(present, size=counts[i])
        regions[schema.FEATURES][i, : counts[i]] = prototypes[owners] + noise * rng.standard_normal((counts[i], feature_dim))
        regions[schema.BOXES][i, : counts[i]] = [0, 0, SEG_MAP_SIZE, SEG_MAP_SIZE]
        for stripe, concept in enumerate(present):
            left, right = SEG_MAP_SIZE * stripe // len(present), SEG_MAP_SIZE * (stripe + 1) // len(present)
            seg_map[i, 8:56, left:right] = classes[concept]
            cat_onehot[i, classes[concept]] = 1
            cells = slice(SEG_CELLS * stripe // len(present), SEG_CELLS * (stripe + 1) // len(present) + 1)
            seg_feat[i, classes[concept], 1:6, cells] = 1.0
    write_stage(
        root,
        schema.REGIONS,
        image_ids,
        regions,
        {"synthetic": True, "num_boxes": num_boxes},
        table={schema.NUM_BOXES: counts},
        shard_size=shard_size,
    )
    write_stage(root, schema.LAYOUT, image_ids, layout, {"synthetic": True}, shard_size=shard_size)
    if grid_size:
        grid = schema.filled(schema.GRID, n, G=grid_size, C=feature_dim)
        for i, present in enumerate(concepts):
            h, w = (max(1, grid_size - int(rng.integers(0, 2))) for _ in range(2))  # some grids padded
            columns = np.array([present[c * len(present) // w] for c in range(w)])
            grid[schema.GRID_FEATURES][i, :h, :w] = prototypes[columns][None] + noise * rng.standard_normal((h, w, feature_dim))
            grid[schema.VALID_HW][i] = (h, w)
        write_stage(root, schema.GRID, image_ids, grid, {"synthetic": True, "grid_size": grid_size}, shard_size=shard_size)

    split_of = np.repeat(list(splits), list(splits.values()))
    rows = []
    for i, present in enumerate(concepts):
        for k in range(CAPTIONS_PER_IMAGE):
            words = [f"a {concept_word(c)}" for c in rng.permutation(present)]
            rows.append((image_ids[i], f"{OPENINGS[k % len(OPENINGS)]} " + rng.choice(CONNECTORS).join(words), split_of[i]))
    return pd.DataFrame(rows, columns=["image_id", "caption", "split"])


def concept_word(concept: int) -> str:
    return CONCEPT_WORDS[concept] if concept < len(CONCEPT_WORDS) else f"object{concept}"
