"""The trainer's cache reader: the images one or more caches hold for a model level, joined on
``image_id``, and one image's model inputs read from their HDF5 shards (or from RAM). Torch-free:
the trainer, ``encode`` and ``show`` read caches through it and never open a shard themselves.

For every stage the first cache that holds an image with status ``ok`` wins. HDF5 files are opened
lazily, once per process (so DataLoader workers each open their own and an open handle is never
pickled or inherited); ``in_memory`` instead reads the split's arrays into RAM once, fp16 features
and uint8 maps, with the same values the HDF5 path yields. Padded rows are cut by the schema's
valid-rows rule (:func:`shnet.cache.schema.valid_rows`, :func:`~shnet.cache.schema.valid_cells`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from ..errors import CacheError, ShnetError
from ..fileio import open_h5
from . import schema
from .store import Cache

LEVEL_STAGES = {"region": (schema.REGIONS, schema.LAYOUT), "grid": (schema.GRID, schema.LAYOUT)}
MODEL_ARRAYS = {
    schema.REGIONS: (schema.FEATURES, schema.NUM_BOXES),
    schema.GRID: (schema.GRID_FEATURES, schema.VALID_HW),
    schema.LAYOUT: schema.LAYOUT_INPUTS,
}
_RAM_HEADROOM = 0.8  # share of the available memory that --in-memory may fill
_PADDED_SIZES = (schema.K, schema.G)  # box count / grid size: caches may pad them differently


def refuse_damaged(cache: Cache, stage: str) -> None:
    """A done shard whose files are not what its marker vouches for is named before any training."""
    damaged = cache.damaged_shards(stage)
    if damaged:
        shard, problem = next(iter(damaged.items()))
        raise CacheError(f"{cache.root}: stage '{stage}' shard {shard}: {problem} ({len(damaged)} damaged shard(s)); {cache.redo_hint(stage, shard)}")


def open_shard(path: str) -> h5py.File:
    return open_h5(path, "the cache shard", "re-run `shnet extract` on its cache to redo the shard (see README 'Repairing a damaged cache')", CacheError)


@dataclass
class StageLocations:
    """Where each image of one stage lives: a file per (cache, shard) and the row inside it."""

    files: list[str]
    file_of: dict[str, int]  # image_id -> index into files
    row_of: dict[str, int]
    problems: dict[str, str]  # image_id -> why it cannot be used (failed / not extracted)


UNKNOWN_CLASS_ORDER = "unknown"


def layout_class_order(cache: Cache) -> str:
    """The class order of a cache's layout arrays: as configured, ``coco`` for a layout extracted
    before the option existed, ``unknown`` for an imported ``.npy`` set (its files do not say)."""
    config = cache.stage_config(schema.LAYOUT) or {}
    if "class_order" in config:
        return str(config["class_order"])
    return UNKNOWN_CLASS_ORDER if schema.is_imported(config) else "coco"


class FeatureIndex:
    """The images that one or more caches hold for a model level, and where their arrays are."""

    def __init__(self, cache_roots: Sequence[str | Path], level: str):
        if level not in LEVEL_STAGES:
            raise ShnetError(f"unknown model level '{level}'; choose region or grid")
        if not cache_roots:
            raise ShnetError("no feature cache given; pass --cache CACHE_DIR (repeatable)")
        self.level = level
        self.stages = LEVEL_STAGES[level]
        self.caches = [Cache(root) for root in cache_roots]
        self.image_ids: list[str] = list(dict.fromkeys(i for c in self.caches for i in c.images()["image_id"].astype(str)))
        self.locations = {stage: self._locate(stage) for stage in self.stages}
        self.shapes = self._array_shapes()
        self.class_order = self._class_order()

    def _locate(self, stage: str) -> StageLocations:
        files, frames = [], []
        for cache in self.caches:
            shards = cache.done_shards(stage)
            if not shards:
                continue
            refuse_damaged(cache, stage)
            table = cache.stage_table(stage)
            if schema.NUM_BOXES in table:  # a model input needs at least one region
                empty = (table["status"] == "ok") & (table[schema.NUM_BOXES] == 0)
                table.loc[empty, ["status", "error"]] = ["empty", "no region detected"]
            table = table[["image_id", "shard", "row", "status", "error"]]
            file_index = {shard: len(files) + i for i, shard in enumerate(shards)}
            files.extend(str(cache.array_path(stage, shard)) for shard in shards)
            frames.append(table.assign(file=table["shard"].map(file_index)))
        if not frames:
            roots = ", ".join(str(c.root) for c in self.caches)
            raise ShnetError(
                f"the {self.level} model needs stage '{stage}', which no given cache has ({roots}); "
                f"run `shnet extract ... --stages {stage}` or add the cache that holds it with --cache"
            )
        table = pd.concat(frames, ignore_index=True)
        table["image_id"] = table["image_id"].astype(str)
        table = table.iloc[np.argsort((table["status"] != "ok").to_numpy(), kind="stable")]
        table = table.drop_duplicates("image_id", keep="first")
        ok, failed = table[table["status"] == "ok"], table[table["status"] != "ok"]
        problems = {i: f"{stage}: {e or 'failed'}" for i, e in zip(failed["image_id"], failed["error"])}
        present = set(table["image_id"])
        problems.update({i: f"{stage}: not extracted" for i in self.image_ids if i not in present})
        return StageLocations(
            files=files,
            file_of=dict(zip(ok["image_id"], ok["file"].astype(int))),
            row_of=dict(zip(ok["image_id"], ok["row"].astype(int))),
            problems=problems,
        )

    def _array_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shapes of every array, checked to agree across the files of a stage (apart
        from the box count and grid size, which caches may pad differently)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for stage in self.stages:
            for path in self.locations[stage].files:
                with open_shard(path) as h5:
                    for name, dataset in h5.items():
                        shape, key = tuple(dataset.shape[1:]), f"{stage}/{name}"
                        seen = shapes.setdefault(key, shape)
                        skip = _padded_leading_dims(stage, name)
                        if seen[skip:] != shape[skip:]:
                            raise ShnetError(f"{path}: '{name}' has per-image shape {shape}, other shards of stage '{stage}' have {seen}")
            lacking = [name for name in MODEL_ARRAYS[stage] if f"{stage}/{name}" not in shapes]
            if lacking:
                raise ShnetError(
                    f"the {self.level} model needs array(s) {', '.join(lacking)} of stage '{stage}', which the given caches lack "
                    "(a cache imported from a set without those .npy files?); add a cache that holds them with --cache"
                )
        return shapes

    def _class_order(self) -> str:
        """The class order of the layout arrays the caches give (``coco``, ``upsnet``, or ``unknown``
        for an imported set); caches of two different known orders are refused, never mixed."""
        orders = {str(c.root): layout_class_order(c) for c in self.caches if c.done_shards("layout")}
        known = {order for order in orders.values() if order != UNKNOWN_CLASS_ORDER}
        if len(known) > 1:
            listing = ", ".join(f"{root}: {order}" for root, order in orders.items())
            raise ShnetError(
                f"the caches' layout arrays use different class orders ({listing}); the class ids of seg_map, cat_onehot and "
                "seg_feat would mean different classes. Extract them with one --set layout.class_order=..."
            )
        return known.pop() if known else UNKNOWN_CLASS_ORDER

    def check_model_fits(self, config, class_order: str | None, model_source: str) -> None:
        """Refuse a model (``config``, trained on layout arrays in ``class_order``; None when unknown)
        that these caches' features or classes do not fit."""
        if (config.region_dim, config.num_classes) != (self.feature_dim, self.num_classes):
            raise ShnetError(
                f"{model_source} takes {config.region_dim}-d {config.level} features and {config.num_classes} classes; "
                f"the caches ({', '.join(str(c.root) for c in self.caches)}) give {self.feature_dim}-d and {self.num_classes}"
            )
        if class_order not in (None, UNKNOWN_CLASS_ORDER, self.class_order) and self.class_order != UNKNOWN_CLASS_ORDER:
            raise ShnetError(
                f"{model_source} was trained on layout arrays in class order '{class_order}'; the caches "
                f"({', '.join(str(c.root) for c in self.caches)}) hold class order '{self.class_order}'. "
                f"Extract the layout with --set layout.class_order={class_order}"
            )

    @property
    def feature_dim(self) -> int:
        """Channels of a region feature (region level) or a grid cell (grid level)."""
        key = f"{schema.REGIONS}/{schema.FEATURES}" if self.level == "region" else f"{schema.GRID}/{schema.GRID_FEATURES}"
        return int(self.shapes[key][-1])

    @property
    def num_classes(self) -> int:
        return int(self.shapes[f"{schema.LAYOUT}/{schema.CAT_ONEHOT}"][0])

    def problem(self, image_id: str) -> str | None:
        for stage in self.stages:
            reason = self.locations[stage].problems.get(image_id)
            if reason is not None:
                return reason
        return None

    def reader(self, image_ids: Sequence[str]) -> "FeatureReader":
        """A reader of these images' model inputs (they must all be usable)."""
        return FeatureReader(
            level=self.level,
            files={stage: self.locations[stage].files for stage in self.stages},
            file_index={stage: np.array([self.locations[stage].file_of[i] for i in image_ids], dtype=np.int64) for stage in self.stages},
            rows={stage: np.array([self.locations[stage].row_of[i] for i in image_ids], dtype=np.int64) for stage in self.stages},
        )


class FeatureReader:
    """One image's model inputs as numpy arrays, from HDF5 (opened lazily per process) or RAM."""

    LAYOUT = schema.LAYOUT_INPUTS

    def __init__(self, level: str, files: dict[str, list[str]], file_index: dict[str, np.ndarray], rows: dict[str, np.ndarray]):
        self.level = level
        self.token_stage = schema.REGIONS if level == "region" else schema.GRID
        self.files, self.file_index, self.rows = files, file_index, rows
        self.memory: dict[str, np.ndarray] | None = None
        self._files: dict[str, h5py.File] = {}
        self._datasets: dict[str, dict[str, h5py.Dataset]] = {}  # per file: its datasets by name
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows[schema.LAYOUT])

    @property
    def _token_array(self) -> str:
        return schema.FEATURES if self.level == "region" else schema.GRID_FEATURES

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_datasets"] = {}, {}
        return state

    def _open(self, stage: str, i: int) -> dict[str, h5py.Dataset]:
        """The datasets of the file holding image ``i`` of ``stage``, opened once per process
        (looking a dataset up by name costs as much as reading a small one)."""
        if self._pid != os.getpid():  # a forked worker: never use the parent's handles
            self._files, self._datasets, self._pid = {}, {}, os.getpid()
        path = self.files[stage][self.file_index[stage][i]]
        datasets = self._datasets.get(path)
        if datasets is None:
            h5 = self._files[path] = open_shard(path)
            datasets = self._datasets[path] = {name: h5[name] for name in h5}
        return datasets

    def read(self, i: int) -> dict[str, np.ndarray]:
        """``tokens`` [n, C] fp16 (the valid regions, or the valid grid cells row-major),
        ``seg_feat`` fp16, ``seg_map`` and ``cat_onehot`` uint8."""
        if self.memory is not None:
            start, stop = self.memory["token_offsets"][i : i + 2]
            return {"tokens": self.memory["tokens"][start:stop], **{name: self.memory[name][i] for name in self.LAYOUT}}
        layout, row = self._open(schema.LAYOUT, i), int(self.rows[schema.LAYOUT][i])
        return {"tokens": self._read_tokens(i), **{name: layout[name][row] for name in self.LAYOUT}}

    def _read_tokens(self, i: int) -> np.ndarray:
        h5, row = self._open(self.token_stage, i), int(self.rows[self.token_stage][i])
        if self.level == "region":
            return schema.valid_rows(h5[schema.FEATURES][row], h5[schema.NUM_BOXES][row])
        return schema.valid_cells(h5[schema.GRID_FEATURES][row], h5[schema.VALID_HW][row])

    def _selections(self, stage: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Per file of ``stage``: its path, the reader positions it serves and their rows."""
        for f in np.unique(self.file_index[stage]):
            positions = np.flatnonzero(self.file_index[stage] == f)
            yield self.files[stage][f], positions, self.rows[stage][positions]

    def memory_bytes(self) -> int:
        """What :meth:`load_in_memory` holds at most (padded token counts), from the files' shapes."""
        total = 0
        for stage, names in ((self.token_stage, (self._token_array,)), (schema.LAYOUT, self.LAYOUT)):
            for path, positions, _ in self._selections(stage):
                with open_shard(path) as h5:
                    total += sum(int(np.prod(h5[n].shape[1:])) * h5[n].dtype.itemsize for n in names) * len(positions)
        return total

    def load_in_memory(self) -> None:
        """Read every image of the reader into RAM, one shard file at a time (refused when it would not fit)."""
        import psutil

        needed, available = self.memory_bytes(), psutil.virtual_memory().available
        if needed > _RAM_HEADROOM * available:
            raise ShnetError(
                f"--in-memory needs about {needed / 2**30:.1f} GiB for this split, {available / 2**30:.1f} GiB of RAM is free; "
                "drop --in-memory to read features from the HDF5 cache"
            )
        n = len(self)
        tokens: list[np.ndarray | None] = [None] * n
        for path, positions, rows in self._selections(self.token_stage):
            with open_shard(path) as h5:
                lo, hi = int(rows.min()), int(rows.max()) + 1
                if self.level == "region":
                    block, counts = h5[schema.FEATURES][lo:hi], h5[schema.NUM_BOXES][lo:hi]
                    for position, row in zip(positions, rows - lo):
                        tokens[position] = schema.valid_rows(block[row], counts[row])
                else:
                    block, valid = h5[schema.GRID_FEATURES][lo:hi], h5[schema.VALID_HW][lo:hi]
                    for position, row in zip(positions, rows - lo):
                        tokens[position] = schema.valid_cells(block[row], valid[row])
        memory = {"token_offsets": np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)}
        memory["tokens"] = np.concatenate(tokens).astype(np.float16)
        for path, positions, rows in self._selections(schema.LAYOUT):
            with open_shard(path) as h5:
                lo, hi = int(rows.min()), int(rows.max()) + 1
                for name in self.LAYOUT:
                    block = h5[name][lo:hi]
                    if name not in memory:
                        memory[name] = np.empty((n,) + block.shape[1:], block.dtype)
                    memory[name][positions] = block[rows - lo]
        self.close()
        self.memory = memory

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files, self._datasets = {}, {}


def _padded_leading_dims(stage: str, name: str) -> int:
    """How many leading per-image axes of an array are padded sizes (K, G) that may differ between
    caches; the rest must agree across every shard of a stage."""
    array = schema.STAGE_ARRAYS.get(stage, {}).get(name)
    shape = array.shape if array is not None else ()
    count = 0
    while count < len(shape) and shape[count] in _PADDED_SIZES:
        count += 1
    return count
