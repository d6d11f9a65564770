"""Cached features + captions -> torch datasets and loaders for training and evaluation.

Features come from one or more caches joined on ``image_id`` (say regions from one cache and
layout from another); for every stage the first cache that holds an image with status ``ok`` wins.
HDF5 files are opened lazily, once per process (so DataLoader workers each open their own and an
open handle is never pickled or inherited); ``in_memory`` instead reads the split's arrays into
RAM once, fp16 features and uint8 maps, with the same values the HDF5 path yields.

Training samples are captions paired with their image (the VSE/3SHNet convention). Randomness
(shuffling, region dropout, caption masking) is drawn from generators seeded by (seed, epoch,
index), so a batch does not depend on worker count or timing and a resumed run replays exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CacheError, ShnetError
from ..cache import Cache
from ..fileio import open_h5
from ..cache.captions import CaptionSet, match_images

LEVEL_STAGES = {"region": ("regions", "layout"), "grid": ("grid", "layout")}
MODEL_ARRAYS = {"regions": ("features", "num_boxes"), "grid": ("grid", "valid_hw"), "layout": ("seg_feat", "seg_map", "cat_onehot")}
REGION_DROPOUT = 0.2
_RAM_HEADROOM = 0.8  # share of the available memory that --in-memory may fill
_VARIABLE_LEADING_DIMS = {"features": 1, "boxes": 1, "grid": 2}  # box count / grid size may differ between caches


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
    config = cache.stage_config("layout") or {}
    if "class_order" in config:
        return str(config["class_order"])
    return UNKNOWN_CLASS_ORDER if config.get("source") == "npy-import" else "coco"


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
            if "num_boxes" in table:  # a model input needs at least one region
                empty = (table["status"] == "ok") & (table["num_boxes"] == 0)
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
                        skip = _VARIABLE_LEADING_DIMS.get(name, 0)
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
        return int(self.shapes["regions/features"][-1] if self.level == "region" else self.shapes["grid/grid"][-1])

    @property
    def num_classes(self) -> int:
        return int(self.shapes["layout/cat_onehot"][0])

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


def match_split(captions: CaptionSet, index: FeatureIndex, on_missing: str, warn: Callable[[str], None]) -> CaptionSet:
    """The split's images renamed to cache ids; images without usable features are dropped with a
    warning (``on_missing="drop"``) or refused (``"error"``)."""
    match = match_images(captions.images, index.image_ids)
    for name, image_id in match.cache_ids.items():
        reason = index.problem(image_id)
        if reason is not None:
            match.unusable[image_id] = reason
    keep = [i for i, name in enumerate(captions.images) if name in match.cache_ids and match.cache_ids[name] not in match.unusable]
    if match.num_missing:
        report = match.report(captions.split, captions.num_images)
        if on_missing == "error" or not keep:
            raise ShnetError(report)
        warn(report)
    return captions.subset(keep, rename=[match.cache_ids[captions.images[i]] for i in keep])


class FeatureReader:
    """One image's model inputs as numpy arrays, from HDF5 (opened lazily per process) or RAM."""

    LAYOUT = ("seg_feat", "seg_map", "cat_onehot")

    def __init__(self, level: str, files: dict[str, list[str]], file_index: dict[str, np.ndarray], rows: dict[str, np.ndarray]):
        self.level = level
        self.token_stage = "regions" if level == "region" else "grid"
        self.files, self.file_index, self.rows = files, file_index, rows
        self.memory: dict[str, np.ndarray] | None = None
        self._files: dict[str, h5py.File] = {}
        self._datasets: dict[str, dict[str, h5py.Dataset]] = {}  # per file: its datasets by name
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows["layout"])

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
        layout, row = self._open("layout", i), int(self.rows["layout"][i])
        return {"tokens": self._read_tokens(i), **{name: layout[name][row] for name in self.LAYOUT}}

    def _read_tokens(self, i: int) -> np.ndarray:
        h5, row = self._open(self.token_stage, i), int(self.rows[self.token_stage][i])
        if self.level == "region":
            return h5["features"][row, : int(h5["num_boxes"][row])]
        h, w = (int(v) for v in h5["valid_hw"][row])
        cells = h5["grid"][row, :h, :w]
        return cells.reshape(h * w, cells.shape[-1])

    def _selections(self, stage: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Per file of ``stage``: its path, the reader positions it serves and their rows."""
        for f in np.unique(self.file_index[stage]):
            positions = np.flatnonzero(self.file_index[stage] == f)
            yield self.files[stage][f], positions, self.rows[stage][positions]

    def memory_bytes(self) -> int:
        """What :meth:`load_in_memory` holds at most (padded token counts), from the files' shapes."""
        total = 0
        for stage, names in ((self.token_stage, ("features" if self.level == "region" else "grid",)), ("layout", self.LAYOUT)):
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
                    block, counts = h5["features"][lo:hi], h5["num_boxes"][lo:hi]
                    for position, row in zip(positions, rows - lo):
                        tokens[position] = block[row, : int(counts[row])]
                else:
                    block, valid = h5["grid"][lo:hi], h5["valid_hw"][lo:hi]
                    for position, row in zip(positions, rows - lo):
                        h, w = (int(v) for v in valid[row])
                        tokens[position] = block[row, :h, :w].reshape(h * w, block.shape[-1])
        memory = {"token_offsets": np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)}
        memory["tokens"] = np.concatenate(tokens).astype(np.float16)
        for path, positions, rows in self._selections("layout"):
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


def drop_regions(tokens: np.ndarray, rng: np.random.Generator, rate: float = REGION_DROPOUT) -> np.ndarray:
    """Drop each region (grid cell) with probability ``rate``, keeping at least one."""
    if len(tokens) == 0:
        return tokens
    keep = rng.random(len(tokens)) >= rate
    if not keep.any():
        keep[rng.integers(len(tokens))] = True
    return tokens[keep]


class TrainPairs(Dataset):
    """(image, caption) pairs, one per caption; items are keyed by (epoch, caption index)."""

    def __init__(self, reader: FeatureReader, captions: CaptionSet, tokenizer, seed: int, region_dropout: float = REGION_DROPOUT):
        self.reader, self.captions, self.tokenizer = reader, captions, tokenizer
        self.seed, self.region_dropout = seed, region_dropout

    def __len__(self) -> int:
        return len(self.captions.captions)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, list[int], int]:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        image = self.reader.read(int(self.captions.caption_image[index]))
        image["tokens"] = drop_regions(image["tokens"], rng, self.region_dropout)
        tokens = self.tokenizer.augment(self.tokenizer.encode(self.captions.captions[index]), rng)
        return image, tokens, index


class ImageItems(Dataset):
    """Each image once (evaluation encodes an image once, not once per caption)."""

    def __init__(self, reader: FeatureReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[dict, int]:
        return self.reader.read(index), index


class CaptionItems(Dataset):
    """Each caption once, tokenised without augmentation."""

    def __init__(self, captions: CaptionSet, tokenizer):
        self.captions, self.tokenizer = captions, tokenizer

    def __len__(self) -> int:
        return len(self.captions.captions)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.tokenizer.encode(self.captions.captions[index]), index


class EpochBatchSampler(Sampler):
    """Shuffled batches of (epoch, index) keys; the order is a function of (seed, epoch) only.

    The last incomplete batch is dropped (BatchNorm needs more than one sample, and every step
    then sees a full batch of negatives), as in the reference training code. With ``ranks`` > 1,
    ``batch_size`` is the global batch and this rank gets its ``rank``-th equal slice of each.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, ranks: int = 1):
        if size < batch_size:
            raise ShnetError(f"the training split has {size} captions, fewer than one batch of {batch_size}; lower --batch-size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.share = rank, batch_size // ranks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * self.share
            yield [(self.epoch, int(i)) for i in order[start : start + self.share]]


def collate_images(images: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The model's image batch: ``regions`` [B,R,C] zero-padded, ``lengths`` [B] and the layout.

    Features stay fp16 and maps uint8, as cached: a quarter to a half of the bytes to collate and
    move to the GPU; the image encoder converts them to float32 on its device.
    """
    lengths = torch.tensor([len(image["tokens"]) for image in images], dtype=torch.long)
    width = images[0]["tokens"].shape[-1]
    regions = np.zeros((len(images), max(int(lengths.max()), 1), width), dtype=images[0]["tokens"].dtype)
    for i, image in enumerate(images):
        regions[i, : len(image["tokens"])] = image["tokens"]
    return {
        "regions": torch.from_numpy(regions),
        "lengths": lengths,
        **{name: torch.from_numpy(np.stack([image[name] for image in images])) for name in FeatureReader.LAYOUT},
    }


def collate_tokens(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), max(int(lengths.max()), 1)), pad_id, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        tokens[i, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
    return tokens, lengths


class PairCollate:
    """Collates :class:`TrainPairs` items (a class, not a closure, so that workers can pickle it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items) -> dict:
        images, tokens, indices = zip(*items)
        token_ids, token_lengths = collate_tokens(tokens, self.pad_id)
        return {"images": collate_images(images), "tokens": token_ids, "token_lengths": token_lengths, "index": torch.tensor(indices)}


def collate_image_items(items) -> dict:
    images, indices = zip(*items)
    return {"images": collate_images(images), "index": torch.tensor(indices)}


class CaptionCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items) -> dict:
        tokens, indices = zip(*items)
        token_ids, token_lengths = collate_tokens(tokens, self.pad_id)
        return {"tokens": token_ids, "token_lengths": token_lengths, "index": torch.tensor(indices)}


def _own_generator() -> torch.Generator:
    """Loaders draw their worker seeds from this, not from the global torch RNG, so that the
    model's dropout sequence does not depend on how many loaders were iterated (or on resuming)."""
    return torch.Generator().manual_seed(0)


def train_loader(
    dataset: TrainPairs, batch_size: int, workers: int, seed: int, pin_memory: bool = False, rank: int = 0, ranks: int = 1
) -> DataLoader:
    """Batches of ``batch_size`` pairs, or this rank's share of them when ``ranks`` processes train."""
    return DataLoader(
        dataset,
        batch_sampler=EpochBatchSampler(len(dataset), batch_size, seed, rank, ranks),
        num_workers=workers,
        collate_fn=PairCollate(dataset.tokenizer.pad_id),
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=_own_generator(),
    )


def image_loader(reader: FeatureReader, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        ImageItems(reader),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_image_items,
        pin_memory=pin_memory,
        generator=_own_generator(),
    )


def caption_loader(captions: CaptionSet, tokenizer, batch_size: int) -> DataLoader:
    """Captions are tokenised in the main process: cheap next to encoding them."""
    return DataLoader(
        CaptionItems(captions, tokenizer), batch_size=batch_size, collate_fn=CaptionCollate(tokenizer.pad_id), generator=_own_generator()
    )
