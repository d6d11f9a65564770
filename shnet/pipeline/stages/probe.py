"""Stage ``probe``: decode every image once and record its upright size, or why it cannot be read.

Every image stage depends on it, so whether an image is usable is decided once per cache and all
stages agree; its tables become ``images.parquet``'s width/height/status/error columns.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ...errors import ImageDecodeError
from ...cache.store import ShardWriter
from .base import ArraySpec, ShardJob, Stage


class ProbeStage(Stage):
    name = "probe"
    requires = ()
    defaults = {"max_pixels": 89_478_485}
    description = "decode check, upright width/height of every image"

    def outputs(self, config, model):
        return {"size": ArraySpec((2,), "int32", -1)}

    def run(self, job: ShardJob, writer: ShardWriter, model) -> pd.DataFrame:
        from ..images import decode_image

        writer.create("size", (2,), "int32", -1)
        rows = []
        sizes = np.full((len(job.images), 2), -1, dtype=np.int32)
        for i, (row, path) in enumerate(zip(job.images["row"], job.images["path"])):
            start = time.perf_counter()
            status, error, height, width = "ok", "", -1, -1
            try:
                rgb = decode_image(path, max_pixels=job.config["max_pixels"])
                height, width = rgb.shape[:2]
            except ImageDecodeError as exc:
                status, error = "error", str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd file must never stop a shard
                status, error = "error", f"cannot decode image {path}: {type(exc).__name__}: {exc}"
            sizes[i] = (height, width)
            rows.append((row, status, error, time.perf_counter() - start, width, height))
        order = np.argsort(job.images["row"].to_numpy())
        writer.write("size", job.images["row"].to_numpy()[order], sizes[order])
        table = pd.DataFrame(rows, columns=["row", "status", "error", "seconds", "width", "height"])
        table.insert(0, "image_id", job.images["image_id"].to_numpy())
        return table
