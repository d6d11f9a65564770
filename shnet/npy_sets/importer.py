"""``shnet import``: a SCAN/3SHNet precomputed set (:mod:`shnet.npy_sets.format`) into a new cache.

Import keeps every array in the file's dtype and records each file's header and each text file's
line endings in the cache, so that an export of an imported split writes the same bytes. It
streams: ``.npy`` files are memory-mapped and copied in blocks of at most ``CHUNK_BYTES``;
per-image region files are read one by one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import pandas as pd

from ..cache.captions import CAPTION_COLUMNS, write_cache_captions
from ..cache.schema import FEATURES, IMPORT_SOURCE, NUM_BOXES, REGIONS
from ..cache.store import create_cache
from ..cache.streaming import write_stage_chunks
from ..errors import ShnetError
from ..fileio import atomic_write_parquet
from .format import (
    ARRAY_KINDS,
    DEFAULT_CAPTIONS_PER_IMAGE,
    DEFAULT_FEATURES_DIR,
    EXAMPLES,
    IMPORT_RECORD,
    KINDS,
    REGION_KIND,
    SPLITS_TABLE,
    ArrayKind,
    NpyHeader,
    RegionFiles,
    SplitFiles,
    TextLines,
    check_features_dir,
    find_splits,
    open_npy,
    refuse_bad_ids,
    rows_per_chunk,
)


@dataclass
class OpenSplit:
    """One split's files opened and checked against each other."""

    files: SplitFiles
    arrays: dict[str, np.ndarray | RegionFiles]  # kind name -> memory map (or the per-image region files)
    headers: dict[str, NpyHeader]
    image_ids: list[str]
    ids_text: TextLines | None
    caps_text: TextLines | None

    @property
    def split(self) -> str:
        return self.files.split

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def region_files(self) -> RegionFiles | None:
        regions = self.arrays.get(REGION_KIND.name)
        return regions if isinstance(regions, RegionFiles) else None


def open_split(files: SplitFiles, captions_per_image: int, region_folder: Path | None = None) -> OpenSplit:
    """The split's files checked; with ``region_folder``, a split with ids and no ``{split}_ims.npy``
    takes its region features from the per-image files there."""
    arrays, headers = {}, {}
    for name, path in files.arrays.items():
        arrays[name], headers[name] = open_npy(path)
        kind = KINDS[name]
        if arrays[name].ndim != kind.ndim:
            raise ShnetError(f"{path} has shape {list(arrays[name].shape)}; a {{split}}_{name}.npy holds {kind.layout}")
    ids_text = TextLines.read(files.ids) if files.ids else None
    caps_text = TextLines.read(files.caps) if files.caps else None
    counts = {path.name: len(arrays[name]) for name, path in files.arrays.items()}
    if ids_text is not None:
        counts[files.ids.name] = len(ids_text.lines)
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise ShnetError(f"the files of split '{files.split}' disagree on the number of images ({listing}); each holds one entry per image")
    if counts:
        num_images = next(iter(counts.values()))
        if caps_text is not None and len(caps_text.lines) != captions_per_image * num_images:
            raise ShnetError(
                f"{files.caps} has {len(caps_text.lines)} lines for {num_images} images; SCAN lays out {captions_per_image} "
                f"captions per image ({captions_per_image * num_images} lines); pass --captions-per-image N if this set has another number"
            )
    else:
        if len(caps_text.lines) % captions_per_image:
            raise ShnetError(
                f"{files.caps} has {len(caps_text.lines)} lines, not a multiple of {captions_per_image} captions per image; "
                "pass --captions-per-image N if this set has another number"
            )
        num_images = len(caps_text.lines) // captions_per_image
    if num_images == 0:
        raise ShnetError(f"split '{files.split}' holds no image (its files: {', '.join(p.name for p in files.paths())})")
    segmentation, onehot = arrays.get("segmentations"), arrays.get("cat_onehots")
    if segmentation is not None and onehot is not None and segmentation.shape[1] != onehot.shape[1]:
        raise ShnetError(
            f"{files.arrays['segmentations'].name} has {segmentation.shape[1]} classes, {files.arrays['cat_onehots'].name} "
            f"{onehot.shape[1]}; both describe the same label set"
        )
    image_ids = [line.strip() for line in ids_text.lines] if ids_text else [f"{files.split}/{i}" for i in range(num_images)]
    refuse_bad_ids(image_ids, files.ids)
    repeated = pd.Index(image_ids)[pd.Index(image_ids).duplicated()].unique().tolist()
    if repeated:
        raise ShnetError(f"{files.ids} lists {len(repeated)} image id(s) more than once, e.g. {', '.join(repeated[:EXAMPLES])}")
    if region_folder is not None and files.ids is not None and REGION_KIND.name not in arrays:
        arrays[REGION_KIND.name] = RegionFiles.scan(region_folder, image_ids, files.ids)
    return OpenSplit(files, arrays, headers, image_ids, ids_text, caps_text)


@dataclass
class ImportReport:
    cache: Path
    splits: dict[str, int]  # split -> images
    images: int  # distinct images in the cache
    stages: list[str]
    captions: int


def import_sets(
    folder: str | Path,
    cache_root: str | Path,
    splits: Sequence[str] = (),
    captions_per_image: int = DEFAULT_CAPTIONS_PER_IMAGE,
    shard_size: int = 1000,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int], ContextManager] | None = None,
    features_dir: str | None = None,
    allow_nonfinite: bool = False,
) -> ImportReport:
    """Import the precomputed set in ``folder`` (its ``splits``, default all) into a new cache.

    The cache is built in a hidden sibling folder and renamed into place when complete, so an
    interrupted import leaves no half cache under the given name. ``progress(label, total)`` may
    give a context manager whose ``update(rows)`` hears of every block written. Per-image region
    files are read from ``folder/features_dir`` (default :data:`DEFAULT_FEATURES_DIR` when present).
    NaN or inf in a float array is refused unless ``allow_nonfinite``.
    """
    if captions_per_image < 1:
        raise ShnetError(f"--captions-per-image must be at least 1 (got {captions_per_image})")
    folder = Path(folder).expanduser().resolve()
    root = Path(cache_root).expanduser().resolve()
    _refuse_existing(root)
    opened, region_dir = _open_splits(folder, splits, captions_per_image, features_dir)
    kinds = _common_kinds(opened)
    dtypes = {name: _cache_dtype(opened, name) for name in kinds}
    kept = _distinct_images(opened, kinds)
    image_ids = [split.image_ids[i] for split in opened for i in kept[split.split]]
    frame = pd.DataFrame({"image_id": image_ids, "path": "", "bytes": -1, "status": "ok", "error": ""})
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{root.name}.importing-{uuid.uuid4().hex[:8]}")
    try:
        cache = create_cache(staging, frame, shard_size, roots=[str(folder)])
        stages = []
        for stage in dict.fromkeys(KINDS[name].stage for name in kinds):
            stage_kinds = [KINDS[name] for name in kinds if KINDS[name].stage == stage]
            config = {"source": IMPORT_SOURCE, "folder": str(folder), "files": [k.name for k in stage_kinds]}
            columns = (NUM_BOXES,) if stage == REGIONS else ()
            label = f"{stage} ({', '.join(k.name for k in stage_kinds)})"
            with (progress or _no_progress)(label, len(image_ids)) as bar:
                blocks = _counted(_stage_blocks(opened, stage_kinds, kept, dtypes, allow_nonfinite), bar)
                write_stage_chunks(cache, stage, config, blocks, table_columns=columns)
            stages.append(stage)
        captions = _captions_frame(opened, captions_per_image)
        if len(captions):
            write_cache_captions(cache, captions)
        region_headers = {s.split: _distinct_headers(s.region_files) for s in opened if s.region_files}
        atomic_write_parquet(cache.root / SPLITS_TABLE, _order_table(opened, region_headers))
        cache.record[IMPORT_RECORD] = {
            "source": str(folder),
            "captions_per_image": captions_per_image,
            "splits": {s.split: _split_record(s, region_dir, region_headers.get(s.split)) for s in opened},
        }
        cache.save_record()
        _refuse_existing(root)
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"imported {folder} into {root}")
    return ImportReport(root, {s.split: s.num_images for s in opened}, len(image_ids), stages, len(captions))


def _open_splits(folder: Path, splits: Sequence[str], captions_per_image: int, features_dir: str | None) -> tuple[list[OpenSplit], str | None]:
    """The splits opened, and the per-image region folder's name when a split reads it. Per-image
    splits share one width (their largest K), so that their features stack in one stage."""
    name = features_dir or DEFAULT_FEATURES_DIR
    check_features_dir(name)
    region_folder = folder / name
    if not region_folder.is_dir():
        if features_dir:
            raise ShnetError(f"{region_folder} is not a folder; --features-dir names the folder of per-image ID.npy files in {folder}")
        region_folder = None
    opened = [open_split(files, captions_per_image, region_folder) for files in find_splits(folder, splits).values()]
    regions = [s.region_files for s in opened if s.region_files]
    if features_dir and not regions:
        raise ShnetError(
            f"no split reads {region_folder}: per-image region features serve a split with a {{split}}_ids.txt and no {{split}}_ims.npy"
        )
    for files in regions:
        files.width = max(r.width for r in regions)
    return opened, name if regions else None


def _refuse_existing(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ShnetError(f"{root} already exists and is not empty; import into a new -o directory")


@contextlib.contextmanager
def _no_progress(label: str, total: int):
    yield None


def _counted(blocks: Iterator[dict], bar) -> Iterator[dict]:
    for block in blocks:
        yield block
        if bar is not None:
            bar.update(len(next(iter(block.values()))))


def _common_kinds(opened: list[OpenSplit]) -> list[str]:
    """The array kinds of the set (in :data:`ARRAY_KINDS` order); every split must have the same."""
    sets = {s.split: sorted(s.arrays) for s in opened}
    first = next(iter(sets.values()))
    if any(kinds != first for kinds in sets.values()):
        listing = "; ".join(f"{split}: {', '.join(kinds) or 'no .npy'}" for split, kinds in sets.items())
        raise ShnetError(f"the splits have different .npy files ({listing}); import them into separate caches with --split")
    for name in first:
        shapes = {s.split: s.arrays[name].shape[1:] for s in opened}
        if len(set(shapes.values())) > 1:
            raise ShnetError(f"the {{split}}_{name}.npy files have different per-image shapes ({shapes}); import them into separate caches with --split")
    return [kind.name for kind in ARRAY_KINDS if kind.name in first]


def _cache_dtype(opened: list[OpenSplit], name: str) -> np.dtype:
    """The dtype that holds every split's values of ``name`` exactly, in native byte order."""
    return np.result_type(*[s.arrays[name].dtype for s in opened]).newbyteorder("=")


def _distinct_images(opened: list[OpenSplit], kinds: list[str]) -> dict[str, np.ndarray]:
    """Per split, the positions of its images not already held by an earlier split. An image id in
    several splits (COCO's test and testall) is stored once, and only if its arrays agree."""
    owner: dict[str, tuple[OpenSplit, int]] = {}
    kept = {}
    for split in opened:
        keep = []
        for position, image_id in enumerate(split.image_ids):
            first = owner.get(image_id)
            if first is None:
                owner[image_id] = (split, position)
                keep.append(position)
                continue
            other, other_position = first
            for name in kinds:
                if not np.array_equal(other.arrays[name][other_position], split.arrays[name][position], equal_nan=True):
                    raise ShnetError(
                        f"image '{image_id}' is in splits '{other.split}' and '{split.split}' with different {{split}}_{name}.npy "
                        "values; import the splits into separate caches with --split"
                    )
        kept[split.split] = np.asarray(keep, dtype=np.int64)
    return kept


def _stage_blocks(
    opened: list[OpenSplit], kinds: list[ArrayKind], kept: dict[str, np.ndarray], dtypes: dict[str, np.dtype], allow_nonfinite: bool = False
) -> Iterator[dict]:
    """Row blocks of one stage in cache order, each at most :data:`CHUNK_BYTES` of array data."""
    for split in opened:
        positions = kept[split.split]
        row_bytes = sum(int(np.prod(split.arrays[k.name].shape[1:])) * dtypes[k.name].itemsize for k in kinds)
        step = rows_per_chunk(row_bytes)
        for start in range(0, len(positions), step):
            chosen = positions[start : start + step]
            contiguous = chosen[-1] - chosen[0] == len(chosen) - 1
            select = slice(int(chosen[0]), int(chosen[-1]) + 1) if contiguous else chosen
            block = {k.array: np.ascontiguousarray(split.arrays[k.name][select], dtype=dtypes[k.name]) for k in kinds}
            if not allow_nonfinite:
                _refuse_nonfinite(split, kinds, block, chosen)
            if FEATURES in block:
                block[NUM_BOXES] = _num_boxes(split, chosen, block[FEATURES].shape[1])
            yield block


def _refuse_nonfinite(split: OpenSplit, kinds: list[ArrayKind], block: dict, chosen: np.ndarray) -> None:
    """Features a model would turn into NaN losses are refused at the door, the file and image named."""
    for kind in kinds:
        values = block[kind.array]
        if not np.issubdtype(values.dtype, np.floating):
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            row = int(chosen[int(np.argmax(bad))])
            source = split.files.arrays.get(kind.name) or split.files.ids
            raise ShnetError(
                f"{source}: image '{split.image_ids[row]}' (row {row}) holds NaN or inf in {kind.name}; "
                "fix the file, or import it as it is with --allow-nonfinite"
            )


def _num_boxes(split: OpenSplit, chosen: np.ndarray, width: int) -> np.ndarray:
    """Regions per image: a per-image file's K, else every row of the whole-split file."""
    if split.region_files:
        return split.region_files.counts[chosen]
    return np.full(len(chosen), width, dtype=np.int32)


def _captions_frame(opened: list[OpenSplit], captions_per_image: int) -> pd.DataFrame:
    frames = [
        pd.DataFrame({"image_id": np.repeat(s.image_ids, captions_per_image), "caption": s.caps_text.lines, "split": s.split})
        for s in opened
        if s.caps_text is not None
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CAPTION_COLUMNS)


def _distinct_headers(files: RegionFiles) -> tuple[list[NpyHeader], np.ndarray]:
    """The distinct headers of a split's per-image files, and each image's position among them."""
    positions: dict[bytes, int] = {}
    index = np.array([positions.setdefault(h.raw, len(positions)) for h in files.headers], dtype=np.int32)
    distinct = {h.raw: h for h in files.headers}
    return [distinct[raw] for raw in positions], index


def _order_table(opened: list[OpenSplit], region_headers: dict[str, tuple[list[NpyHeader], np.ndarray]]) -> pd.DataFrame:
    """Each split's images in file order, with the id lines as written and, for per-image region
    files, which recorded header each image's file had (-1: none)."""
    return pd.DataFrame(
        {
            "split": [s.split for s in opened for _ in s.image_ids],
            "position": np.concatenate([np.arange(s.num_images, dtype=np.int64) for s in opened]),
            "image_id": [i for s in opened for i in s.image_ids],
            "id_line": [line for s in opened for line in (s.ids_text.lines if s.ids_text else s.image_ids)],
            "region_header": np.concatenate(
                [region_headers[s.split][1] if s.split in region_headers else np.full(s.num_images, -1, np.int32) for s in opened]
            ),
        }
    )


def _split_record(split: OpenSplit, region_dir: str | None, region_headers: tuple[list[NpyHeader], np.ndarray] | None) -> dict:
    record = {
        "images": split.num_images,
        "arrays": {name: header.to_record() for name, header in split.headers.items()},
        "ids": split.ids_text.style() if split.ids_text else None,
        "caps": split.caps_text.style() if split.caps_text else None,
    }
    if region_headers is not None:
        record["region_files"] = {"folder": region_dir, "headers": [h.to_record() for h in region_headers[0]]}
    return record
