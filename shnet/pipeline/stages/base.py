"""What a stage is: its options, its dependencies, and how it turns one shard into arrays + a table.

A stage never touches Dask or the cache layout itself: the runner hands it a :class:`ShardJob`
and a :class:`~shnet.cache.store.ShardWriter`. Image stages subclass :class:`ImageStage`, which
streams the shard's decodable images through the model in batches, decoding the next batch in a
background thread while the current one runs.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import pandas as pd

from ...errors import ImageDecodeError, ShnetError
from ...cache.schema import ArraySpec
from ...cache.store import ShardWriter


@dataclass
class ShardJob:
    """Everything a stage needs to process one shard (picklable: sent to Dask workers)."""

    cache_root: str
    stage: str
    shard: int
    images: pd.DataFrame  # image_id, path, row, status, error (status from the probe stage)
    config: dict
    device: str = "cpu"
    batch_size: int = 8
    attempts: int = 3  # tries of this (stage, shard) in one worker before it is reported failed


@dataclass
class StageOutput:
    """Per-batch results: arrays keyed like :meth:`Stage.outputs`, scalars per image for the table."""

    arrays: dict[str, np.ndarray]
    scalars: dict[str, np.ndarray] = field(default_factory=dict)


class Stage:
    """Base of every stage. Subclasses set ``name``, ``requires``, ``defaults`` and implement the rest."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    # stages read when the cache has them: when they run in the same extract, this stage waits for them
    uses: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    # options that name where something is rather than what it is: not part of the config identity
    location_keys: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # run because another stage requires it, never picked with --stages nor listed as a choice
    internal: ClassVar[bool] = False

    def needs_accelerator(self, config: Mapping) -> bool:
        """Whether a task of this stage takes a GPU slot (Dask resource ``GPU=1``) when the extract
        runs with ``--device cuda``. Stages that only read files or shards run beside GPU work."""
        return False

    def annotate_images(self, cache: Any, job: ShardJob) -> pd.DataFrame:
        """Called in the worker, for every stage that ``job.stage`` requires, before that dependent
        runs on the same shard: the job's images with what this stage found about them (the probe
        marks the images that cannot be decoded). ``cache`` is the open cache. Default: unchanged."""
        return job.images

    def image_columns(self, cache: Any) -> pd.DataFrame | None:
        """What this stage contributes to ``images.parquet``: columns indexed by image_id over its
        done shards (None: nothing). The runner merges them into the plan after every extract."""
        return None

    def resolve_config(self, options: Mapping[str, Any]) -> dict:
        """Defaults + options, checked; may add derived identity fields (e.g. the weights sha256)."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{self.name}.{k}" for k in sorted(self.defaults))
            raise ShnetError(f"unknown option(s) {', '.join(f'{self.name}.{k}' for k in unknown)}; valid options: {valid}")
        return {**self.defaults, **dict(options)}

    def check(self, config: Mapping) -> None:
        """Check, in the client and before any cluster starts, what the workers would otherwise find
        too late: weights files read once and matched by name and shape against the model, label
        maps, annotation folders. Raise :class:`ShnetError` naming the file and what to do."""

    def outputs(self, config: Mapping, model: Any) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def attrs(self, config: Mapping, model: Any) -> dict:
        """Extra HDF5 root attributes (model name, weights sha256, label set...)."""
        return {}

    def run(self, job: ShardJob, writer: ShardWriter, model: Any) -> pd.DataFrame:
        """Fill ``writer`` for every row of the shard and return the shard's table."""
        raise NotImplementedError

    def load(self, config: Mapping, device: str) -> Any:
        """Build the stage's model once per worker process (cached by the runner)."""
        return None


class ImageStage(Stage):
    """A stage that runs a model over the decoded RGB images of a shard, batch by batch."""

    requires: ClassVar[tuple[str, ...]] = ("probe",)

    def needs_accelerator(self, config: Mapping) -> bool:
        return True

    #: shorter side a JPEG may be draft-decoded down to (None: full resolution)
    def draft_size(self, config: Mapping) -> int | None:
        return None

    def prepare(self, rgb: np.ndarray, config: Mapping, model: Any) -> Any:
        """Per-image CPU preprocessing, run where the batch is decoded (e.g. resize + normalise; :func:`decodes_ahead`)."""
        return rgb

    def infer(self, model: Any, prepared: list, config: Mapping, device: str) -> StageOutput:
        raise NotImplementedError

    def run(self, job: ShardJob, writer: ShardWriter, model: Any) -> pd.DataFrame:
        specs = self.outputs(job.config, model)
        for name, spec in specs.items():
            writer.create(name, spec.shape, spec.dtype, spec.fill)
        table = job.images[["image_id", "row"]].copy()
        table["status"] = job.images["status"].where(job.images["status"] == "error", "ok").to_numpy()
        table["error"] = job.images["error"].fillna("").to_numpy()
        table["seconds"] = 0.0
        scalar_columns: dict[str, np.ndarray] = {}
        todo = job.images[job.images["status"] != "error"]
        for batch, prepared, failures, decode_seconds in self._prefetched_batches(todo, job, model):
            for row, message in failures:
                table.loc[table["row"] == row, ["status", "error"]] = ["error", message]
            if not batch:
                continue
            start = time.perf_counter()
            out = self.infer(model, prepared, job.config, job.device)
            elapsed = time.perf_counter() - start + decode_seconds
            rows = np.asarray(batch)
            order = np.argsort(rows)
            for name, values in out.arrays.items():
                writer.write(name, rows[order], values[order])
            for name, values in out.scalars.items():
                column = scalar_columns.setdefault(name, np.zeros(len(table), dtype=np.asarray(values).dtype))
                column[rows] = values
            table.loc[table["row"].isin(rows), "seconds"] = elapsed / len(rows)
        for name, column in scalar_columns.items():
            table[name] = column[table["row"].to_numpy()]
        return table.reset_index(drop=True)

    def _prefetched_batches(self, todo: pd.DataFrame, job: ShardJob, model: Any) -> Iterator:
        """Yield (rows, prepared, failures, decode_seconds) per batch, decoding one batch ahead in a
        thread of its own where that overlaps (:func:`decodes_ahead`), in line otherwise."""
        records = list(zip(todo["row"].tolist(), todo["path"].tolist()))
        chunks = [records[i : i + job.batch_size] for i in range(0, len(records), job.batch_size)]
        if not chunks:
            return
        if not decodes_ahead(job.device):
            for chunk in chunks:
                yield self._decode_batch(chunk, job.config, model)
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shnet-decode") as pool:
            pending = pool.submit(self._decode_batch, chunks[0], job.config, model)
            for index in range(len(chunks)):
                result = pending.result()
                if index + 1 < len(chunks):
                    pending = pool.submit(self._decode_batch, chunks[index + 1], job.config, model)
                yield result

    def _decode_batch(self, chunk: list, config: Mapping, model: Any):
        from ..images import decode_image

        start = time.perf_counter()
        rows, prepared, failures = [], [], []
        draft = self.draft_size(config)
        for row, path in chunk:
            try:
                prepared.append(self.prepare(decode_image(path, draft_size=draft), config, model))
                rows.append(row)
            except ImageDecodeError as exc:
                failures.append((row, str(exc)))
            except Exception as exc:  # noqa: BLE001 - one odd file must never stop a shard
                failures.append((row, f"cannot process image {path}: {type(exc).__name__}: {exc}"))
        return rows, prepared, failures, time.perf_counter() - start


def decodes_ahead(device: str) -> bool:
    """Whether a stage decodes its next batch in a thread while the model runs: yes on an accelerator,
    and on the CPU when torch runs the model on one thread; not when a team of torch threads runs it
    on the CPU. A decode thread beside such a team takes a core from one of its threads, and each
    parallel region of the model then waits for that thread: the panoptic stage (one worker, two
    threads) ran 0.604-0.636 s/img decoding in line against 0.631-0.702 decoding ahead (alternating
    runs); the grid stage (two workers of one thread) ran the same either way."""
    if device != "cpu":
        return True
    import torch

    return torch.get_num_threads() == 1
