"""Benchmark image sets (real photos, scikit-image / scikit-learn samples, cropped and flipped into many
files) and the pipeline runs' time to their first stored shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _sources() -> list[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    gray = skimage.data.camera()
    return [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        load_sample_image("china.jpg"),
        load_sample_image("flower.jpg"),
        np.stack([gray] * 3, -1),
    ]


def write_image_set(folder: Path, count: int, size: tuple[int, int] | list[tuple[int, int]] = (480, 640), seed: int = 0) -> Path:
    """``count`` distinct JPEGs of ``size`` (h, w), or of a list of sizes in turn (image i gets
    ``size[i % len(size)]``): random crops, flips and rescales of real photos."""
    sizes = size if isinstance(size, list) else [size]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = _sources()
    for i in range(count):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = src[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        height, width = sizes[i % len(sizes)]
        image = Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BILINEAR)
        image.save(folder / f"img{i:06d}.jpg", quality=90)
    return folder


def first_shard_seconds(cache: Path, stage: str, started: float) -> float:
    """Seconds from ``started`` (a ``time.time()`` taken as the command started) to the first done
    marker of ``stage``: the time a user waits for the first stored shard."""
    return min(path.stat().st_mtime for path in (cache / stage).glob("*.done")) - started
