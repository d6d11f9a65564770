"""Stage ``probe``: check that every image decodes and record its upright size, or why it cannot be read.

Every image stage depends on it, so whether an image is usable is decided once per cache and all
stages agree: before a dependent stage runs on a shard, :meth:`ProbeStage.annotate_images` marks the
images the probe could not decode, and its tables become ``images.parquet``'s width/height/status/error
columns (:meth:`ProbeStage.image_columns`). The runner calls both hooks without knowing this stage.

The image stages decode every image again at the size they need, so the probe does not pay for a
second full decode: a JPEG is decoded at 1/8 scale (:func:`probe_image`).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ...cache import schema
from ...cache.store import ShardWriter
from ...errors import ImageDecodeError, ShnetError
from .base import ShardJob, Stage


#: the columns of images.parquet the probe fills
IMAGE_COLUMNS = ("status", "error", "width", "height")


def probe_image(path, max_pixels: int) -> tuple[int, int]:
    """The upright (width, height) of an image whose pixels decode; ``ImageDecodeError`` otherwise.

    A JPEG is decoded at 1/8 scale: its whole entropy-coded stream is still read, so a truncated or
    corrupt file fails as in a full decode, with the same message, for a fraction of the cost (the
    inverse DCT and colour conversion of 1/64 of the pixels); its size then comes from the header
    (EXIF orientation applied). Other formats are decoded in full, and the two sizes agree.
    """
    from ..images import decode_image, image_size

    decode_image(path, max_pixels=max_pixels, draft_size=1)
    return image_size(path)


class ProbeStage(Stage):
    name = schema.PROBE
    requires = ()
    internal = True
    defaults = {"max_pixels": 89_478_485}
    description = "decode check, upright width/height of every image"

    def annotate_images(self, cache, job: ShardJob) -> pd.DataFrame:
        """The job's images with the probe's status and error for each of them."""
        if not cache.is_done(self.name, job.shard):
            raise ShnetError(f"internal: stage '{job.stage}' ran before the probe of shard {job.shard}")
        probe = pd.read_parquet(cache.table_path(self.name, job.shard), columns=["row", "status", "error"])
        return job.images.drop(columns=[c for c in ("status", "error") if c in job.images]).merge(probe, on="row", how="left")

    def image_columns(self, cache) -> pd.DataFrame | None:
        probed = cache.done_shards(self.name)
        if not probed:
            return None
        tables = [cache.shard_table(self.name, shard, columns=["image_id", *IMAGE_COLUMNS]) for shard in probed]
        return pd.concat(tables, ignore_index=True).set_index("image_id")

    def outputs(self, config, model):
        return schema.specs(schema.PROBE)

    def run(self, job: ShardJob, writer: ShardWriter, model) -> pd.DataFrame:
        for name, spec in self.outputs(job.config, model).items():
            writer.create(name, spec.shape, spec.dtype, spec.fill)
        rows = []
        sizes = schema.filled(schema.PROBE, len(job.images))[schema.SIZE]
        for i, (row, path) in enumerate(zip(job.images["row"], job.images["path"])):
            start = time.perf_counter()
            status, error, height, width = "ok", "", -1, -1
            try:
                width, height = probe_image(path, job.config["max_pixels"])
            except ImageDecodeError as exc:
                status, error = "error", str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd file must never stop a shard
                status, error = "error", f"cannot decode image {path}: {type(exc).__name__}: {exc}"
            sizes[i] = (height, width)
            rows.append((row, status, error, time.perf_counter() - start, width, height))
        order = np.argsort(job.images["row"].to_numpy())
        writer.write(schema.SIZE, job.images["row"].to_numpy()[order], sizes[order])
        table = pd.DataFrame(rows, columns=["row", "status", "error", "seconds", "width", "height"])
        table.insert(0, "image_id", job.images["image_id"].to_numpy())
        return table
