"""SCAN / 3SHNet precomputed ``.npy`` sets: their folder layout, ``shnet import`` and ``shnet export``.

A set is a folder of per-split files, as the SCAN (``data.py``) and 3SHNet
(``lib/datasets/image_caption_segmentation_sp_se_new.py``) loaders read them::

    {split}_ims.npy            [N, 36, 2048] region features (SCAN ships float32) <-> regions/features
    {split}_segmentations.npy  [N, 133, 7, 7] per-class spatial volume           <-> layout/seg_feat
    {split}_seg_maps.npy       [N, 64, 64] class id per cell                      <-> layout/seg_map
    {split}_cat_onehots.npy    [N, 133] class present or not                      <-> layout/cat_onehot
    {split}_caps.txt           captions, one a line: image i's on lines 5i..5i+4  <-> captions.parquet
    {split}_ids.txt            one image id a line                                <-> image_id
    coco_region_features/ID.npy  [K, 2048] one image's region features, per line ID of
                               {split}_ids.txt (the published COCO loader; no {split}_ims.npy)
                                                                              <-> regions/features

Any subset of these files may be present. Import keeps every array in the file's dtype and
records each file's header and each text file's line endings, so that export of an imported split
writes the same bytes. Both directions stream: ``.npy`` files are memory-mapped (never unpickled)
and copied in blocks of at most :data:`CHUNK_BYTES`; per-image files are read and written one
by one (:mod:`shnet.cache.npy_region_files`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from ..errors import ShnetError
from .captions import read_cache_captions, write_cache_captions
from .npy_files import NpyHeader, TextLines, open_npy, write_atomically
from ..fileio import plain_name, read_parquet, refuse_control_characters
from .npy_region_files import DEFAULT_FEATURES_DIR, RegionFiles, check_features_dir, check_region_ids, region_file, write_region_file
from .store import Cache, atomic_write_parquet, create_cache
from .streaming import write_stage_chunks

CHUNK_BYTES = 64 * 2**20  # the most array bytes read and written at once
SPLITS_TABLE = "splits.parquet"  # an imported cache: split, position, image_id, id_line (each split's image order), region_header
IMPORT_RECORD = "npy_import"  # cache.json key: source folder, per split its files' headers and text styles
DEFAULT_CAPTIONS_PER_IMAGE = 5
_EXAMPLES = 5


@dataclass(frozen=True)
class ArrayKind:
    """One ``{split}_{name}.npy`` file kind and the cache array it corresponds to."""

    name: str
    stage: str
    array: str
    ndim: int  # including the image axis
    export_dtype: str  # written from a cache that was not imported (safe casts only)
    layout: str


ARRAY_KINDS = (
    ArrayKind("ims", "regions", "features", 3, "float32", "[N, boxes, channels] region features"),
    ArrayKind("segmentations", "layout", "seg_feat", 4, "float32", "[N, classes, 7, 7] segmentation features"),
    ArrayKind("seg_maps", "layout", "seg_map", 3, "uint8", "[N, 64, 64] class maps"),
    ArrayKind("cat_onehots", "layout", "cat_onehot", 2, "uint8", "[N, classes] class presence"),
)
KINDS = {kind.name: kind for kind in ARRAY_KINDS}
_ARRAY_FILE = re.compile(r"^(?P<split>.+)_(?P<kind>ims|segmentations|seg_maps|cat_onehots)\.npy$")
_TEXT_FILE = re.compile(r"^(?P<split>.+)_(?P<kind>caps|ids)\.txt$")


def array_file(folder: Path, split: str, kind: str) -> Path:
    return folder / f"{split}_{kind}.npy"


def text_file(folder: Path, split: str, kind: str) -> Path:
    return folder / f"{split}_{kind}.txt"


# --- finding the files of a set ---------------------------------------------------------------
@dataclass
class SplitFiles:
    split: str
    arrays: dict[str, Path] = field(default_factory=dict)  # kind name -> path
    caps: Path | None = None
    ids: Path | None = None


def find_splits(folder: str | Path, splits: Sequence[str] = ()) -> dict[str, SplitFiles]:
    """The recognised files of ``folder`` by split (only ``splits`` when given), splits sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ShnetError(f"{folder} is not a folder; give the folder that holds the {{split}}_ims.npy / {{split}}_caps.txt files")
    found: dict[str, SplitFiles] = {}
    for path in sorted(folder.iterdir()):
        array_match, text_match = _ARRAY_FILE.match(path.name), _TEXT_FILE.match(path.name)
        if not path.is_file() or not (array_match or text_match):
            continue
        if array_match:
            found.setdefault(array_match["split"], SplitFiles(array_match["split"])).arrays[array_match["kind"]] = path
        else:
            entry = found.setdefault(text_match["split"], SplitFiles(text_match["split"]))
            setattr(entry, text_match["kind"], path)
    if not found:
        names = ", ".join(f"{{split}}_{k.name}.npy" for k in ARRAY_KINDS) + ", {split}_caps.txt, {split}_ids.txt"
        raise ShnetError(f"{folder} holds no file of a SCAN/3SHNet precomputed set (looked for {names})")
    if splits:
        unknown = [s for s in splits if s not in found]
        if unknown:
            raise ShnetError(f"{folder} has no files of split(s) {', '.join(unknown)} (it has: {', '.join(sorted(found))})")
        found = {s: found[s] for s in splits}
    return dict(sorted(found.items()))


# --- import ------------------------------------------------------------------------------------
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
        regions = self.arrays.get("ims")
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
        raise ShnetError(f"split '{files.split}' holds no image (its files: {', '.join(p.name for p in _paths(files))})")
    segmentation, onehot = arrays.get("segmentations"), arrays.get("cat_onehots")
    if segmentation is not None and onehot is not None and segmentation.shape[1] != onehot.shape[1]:
        raise ShnetError(
            f"{files.arrays['segmentations'].name} has {segmentation.shape[1]} classes, {files.arrays['cat_onehots'].name} "
            f"{onehot.shape[1]}; both describe the same label set"
        )
    image_ids = [line.strip() for line in ids_text.lines] if ids_text else [f"{files.split}/{i}" for i in range(num_images)]
    _refuse_bad_ids(image_ids, files.ids)
    repeated = pd.Index(image_ids)[pd.Index(image_ids).duplicated()].unique().tolist()
    if repeated:
        raise ShnetError(f"{files.ids} lists {len(repeated)} image id(s) more than once, e.g. {', '.join(repeated[:_EXAMPLES])}")
    if region_folder is not None and files.ids is not None and "ims" not in arrays:
        arrays["ims"] = RegionFiles.scan(region_folder, image_ids, files.ids)
    return OpenSplit(files, arrays, headers, image_ids, ids_text, caps_text)


def _refuse_bad_ids(image_ids: list[str], source) -> None:
    """An image id is a non-empty name without control characters (one line of {split}_ids.txt)."""
    for line, image_id in enumerate(image_ids, start=1):
        if not image_id:
            raise ShnetError(f"{source}: line {line} is an empty image id; every line names one image")
        refuse_control_characters(image_id, f"{source} line {line}")


def _paths(files: SplitFiles) -> list[Path]:
    return [p for p in (*files.arrays.values(), files.caps, files.ids) if p is not None]


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
            config = {"source": "npy-import", "folder": str(folder), "files": [k.name for k in stage_kinds]}
            columns = ("num_boxes",) if stage == "regions" else ()
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


def rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(int(row_bytes), 1))


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
            if "features" in block:
                block["num_boxes"] = _num_boxes(split, chosen, block["features"].shape[1])
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
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id", "caption", "split"])


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


# --- export ------------------------------------------------------------------------------------
@dataclass
class ExportRequest:
    """One split to write: its images in order and, optionally, their captions (``captions_per_image``
    consecutive captions per image, in image order)."""

    split: str
    image_ids: list[str]
    captions: list[str] | None
    captions_per_image: int = DEFAULT_CAPTIONS_PER_IMAGE
    write_ids: bool = True
    verbatim: bool = False  # captions are lines read from a caps file: written back unchanged
    id_lines: list[str] | None = None  # the ids file's lines as imported (an id's surrounding spaces kept)
    per_image: bool = False  # region features as features_dir/ID.npy per image (the COCO loader), not {split}_ims.npy
    features_dir: str = DEFAULT_FEATURES_DIR
    region_headers: list[NpyHeader] | None = None  # per image: the header of its imported per-image file

    def with_region_layout(self, region_features: str | None, features_dir: str | None) -> "ExportRequest":
        """This request with the layout the user chose (None: as imported, else whole-split)."""
        per_image = self.per_image if region_features is None else region_features == "per-image"
        if features_dir and not per_image:
            raise ShnetError("--features-dir names the folder of per-image region files; add --region-features per-image")
        headers = self.region_headers if per_image else None
        return dataclasses.replace(self, per_image=per_image, features_dir=features_dir or self.features_dir, region_headers=headers)


def imported_split(cache: Cache, split: str) -> ExportRequest:
    """The request that writes ``split`` of an imported cache back as it was imported."""
    record = cache.record.get(IMPORT_RECORD)
    if record is None:
        raise ShnetError(f"{cache.root} was not made by `shnet import`; give --captions FILE to choose and order the split's images")
    if split not in record["splits"]:
        raise ShnetError(f"{cache.root} holds no imported split '{split}' (it has: {', '.join(sorted(record['splits']))})")
    order = read_parquet(cache.root / SPLITS_TABLE, "the imported split order", "re-import the cache (`shnet import`)")
    order = order[order["split"] == split].sort_values("position")
    image_ids = order["image_id"].astype(str).tolist()
    captions = None
    if record["splits"][split]["caps"] is not None:
        table = read_cache_captions(cache)
        rows = table[table["split"] == split]
        captions = rows["caption"].astype(str).tolist()
        if rows["image_id"].astype(str).tolist() != list(np.repeat(image_ids, record["captions_per_image"])):
            raise ShnetError(f"{cache.root}/captions.parquet no longer matches split '{split}' of the import; re-import the set")
    request = ExportRequest(
        split,
        image_ids,
        captions,
        record["captions_per_image"],
        write_ids=record["splits"][split]["ids"] is not None,
        verbatim=True,
        id_lines=order["id_line"].astype(str).tolist(),
    )
    region_files = record["splits"][split].get("region_files")
    if region_files is None:
        return request
    headers = [NpyHeader.from_record(entry) for entry in region_files["headers"]]
    per_image = [headers[i] for i in order["region_header"]]
    return dataclasses.replace(request, per_image=True, features_dir=region_files["folder"], region_headers=per_image)


@dataclass
class _Source:
    """Where the split's images lie in one stage: shard and row per image, in export order."""

    stage: str
    shards: np.ndarray
    rows: np.ndarray
    item_shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]


def export_split(cache: Cache, request: ExportRequest, out_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write ``request``'s split of ``cache`` as a precomputed set into ``out_dir``; returns the files."""
    out = Path(out_dir).expanduser()
    plain_name(request.split, "--split")
    _refuse_bad_ids(request.image_ids, f"the image ids of split '{request.split}'")
    if not request.image_ids:
        raise ShnetError(f"split '{request.split}' has no image to export")
    sources = _export_sources(cache, request)
    if not sources:
        raise ShnetError(
            f"{cache.root} has neither stage 'regions' nor 'layout' (with their arrays); run `shnet extract ... --stages layout` "
            "(and regions) first"
        )
    kinds = [kind for kind in ARRAY_KINDS if kind.stage in sources and kind.array in sources[kind.stage].item_shapes]
    if request.per_image:
        _check_per_image(cache, request, sources, out)
        kinds = [kind for kind in kinds if kind.name != "ims"]
    write_ids = request.write_ids or request.per_image  # the loader finds per-image files by the ids
    targets = [array_file(out, request.split, k.name) for k in kinds]
    if write_ids:
        targets.append(text_file(out, request.split, "ids"))
    if request.captions is not None:
        _check_captions(request)
        targets.append(text_file(out, request.split, "caps"))
    region_targets = [region_file(out / request.features_dir, i) for i in request.image_ids] if request.per_image else []
    existing = [str(p.relative_to(out)) for p in targets + region_targets if p.exists()]
    if existing:
        more = f" and {len(existing) - _EXAMPLES} more" if len(existing) > _EXAMPLES else ""
        raise ShnetError(f"{out} already holds {', '.join(existing[:_EXAMPLES])}{more}; remove them or export into another -o folder")
    out.mkdir(parents=True, exist_ok=True)
    if "regions" in sources and not request.region_headers:
        _note_padding(cache, request, log)
    recorded = cache.record.get(IMPORT_RECORD, {}).get("splits", {}).get(request.split, {})
    with _ShardFiles(cache) as files:
        for kind in kinds:
            header = _export_header(kind, sources[kind.stage], len(request.image_ids), recorded.get("arrays", {}).get(kind.name))
            _write_array(files, sources[kind.stage], kind, header, array_file(out, request.split, kind.name))
        if request.per_image:
            _write_region_files(files, sources["regions"], request, region_targets)
            targets.append(out / request.features_dir)
    styles = recorded if recorded else {"ids": {}, "caps": {}}
    if write_ids:
        write_atomically(text_file(out, request.split, "ids"), TextLines(list(request.id_lines or request.image_ids), **(styles.get("ids") or {})).to_bytes())
    if request.captions is not None:
        lines = request.captions if request.verbatim else [" ".join(c.splitlines()) for c in request.captions]
        write_atomically(text_file(out, request.split, "caps"), TextLines(lines, **(styles.get("caps") or {})).to_bytes())
    return targets


def _check_per_image(cache: Cache, request: ExportRequest, sources: dict[str, "_Source"], out: Path) -> None:
    """Refuse a per-image export that would have no features or write outside the features folder."""
    if "regions" not in sources:
        raise ShnetError(f"{cache.root} has no stage 'regions'; per-image region features need it (`shnet extract ... --stages regions`)")
    check_features_dir(request.features_dir)
    if (out / request.features_dir).exists() and not (out / request.features_dir).is_dir():
        raise ShnetError(f"{out / request.features_dir} is a file; the per-image region files need that name as a folder (--features-dir NAME)")
    check_region_ids(request.image_ids, f"split '{request.split}' of {cache.root}", request.features_dir)


def _write_region_files(files: "_ShardFiles", source: "_Source", request: ExportRequest, paths: list[Path]) -> None:
    """One file per image, read from the cache in blocks of at most :data:`CHUNK_BYTES`: an imported
    file's header and rows when recorded, else every stored row in ``{split}_ims.npy``'s dtype."""
    item_shape = source.item_shapes["features"]
    dtype = _export_dtype(KINDS["ims"], source.dtypes["features"])
    step = rows_per_chunk(int(np.prod(item_shape)) * max(dtype.itemsize, source.dtypes["features"].itemsize))
    for start in range(0, len(paths), step):
        stop = min(start + step, len(paths))
        block = files.read("regions", "features", source.shards[start:stop], source.rows[start:stop])
        for position, values in zip(range(start, stop), block):
            header = request.region_headers[position] if request.region_headers else None
            if header is not None and _describes(header, item_shape):
                write_region_file(paths[position], values, header)
            else:
                write_region_file(paths[position], values.astype(dtype), None)


def _describes(header: NpyHeader, item_shape: tuple[int, ...]) -> bool:
    """Whether an imported file's header fits the stored rows (K of them, the same feature size)."""
    return header.shape[0] <= item_shape[0] and header.shape[1:] == item_shape[1:]


def _check_captions(request: ExportRequest) -> None:
    expected = request.captions_per_image * len(request.image_ids)
    if len(request.captions) != expected:
        raise ShnetError(
            f"split '{request.split}': {len(request.captions)} captions for {len(request.image_ids)} images; "
            f"the precomputed layout needs exactly {request.captions_per_image} per image ({expected})"
        )


def _export_sources(cache: Cache, request: ExportRequest) -> dict[str, _Source]:
    images = cache.images().set_index("image_id")
    missing = [i for i in request.image_ids if i not in images.index]
    if missing:
        raise ShnetError(
            f"{len(missing)} of {len(request.image_ids)} images of split '{request.split}' are not in {cache.root}, "
            f"e.g. {', '.join(missing[:_EXAMPLES])}"
        )
    located = images.loc[request.image_ids]
    shards, rows = located["shard"].to_numpy(np.int64), located["row"].to_numpy(np.int64)
    sources = {}
    for stage in dict.fromkeys(kind.stage for kind in ARRAY_KINDS):
        done = set(cache.done_shards(stage))
        if not done:
            continue
        names = [k.array for k in ARRAY_KINDS if k.stage == stage]
        absent = sorted(set(shards.tolist()) - done)
        if absent:
            raise ShnetError(
                f"stage '{stage}' of {cache.root} is not extracted for shard(s) {absent[:_EXAMPLES]} holding images of split "
                f"'{request.split}'; finish it with `shnet extract` (which resumes)"
            )
        table = cache.stage_table(stage).set_index("image_id")
        status = table.loc[request.image_ids, "status"]
        failed = status[status != "ok"]
        if len(failed):
            errors = table.loc[failed.index, "error"]
            examples = "; ".join(f"{i} ({e or s})" for i, s, e in list(zip(failed.index, failed, errors))[:_EXAMPLES])
            raise ShnetError(f"{len(failed)} images of split '{request.split}' have no usable '{stage}' arrays in {cache.root}, e.g. {examples}")
        with cache.open_arrays(stage, min(done)) as h5:
            shapes = {n: tuple(h5[n].shape[1:]) for n in names if n in h5}
            dtypes = {n: h5[n].dtype for n in names if n in h5}
        if shapes:
            sources[stage] = _Source(stage, shards, rows, shapes, dtypes)
    return sources


def _note_padding(cache: Cache, request: ExportRequest, log: Callable[[str], None]) -> None:
    table = cache.stage_table("regions").set_index("image_id")
    if "num_boxes" not in table:
        return
    counts = table.loc[request.image_ids, "num_boxes"].to_numpy()
    with cache.open_arrays("regions", cache.done_shards("regions")[0]) as h5:
        width = int(h5["features"].shape[1])
    short = int((counts < width).sum())
    written = f"{request.features_dir}/ID.npy files" if request.per_image else f"{request.split}_ims.npy rows"
    if short:
        log(
            f"note: {short} of {len(counts)} images have fewer than {width} regions; their {written} are "
            "zero-padded to that width, and the SCAN/3SHNet loaders take every row as a region"
        )


def _export_header(kind: ArrayKind, source: _Source, num_images: int, recorded: dict | None) -> NpyHeader | None:
    """The imported file's header when it describes the array to write (then the bytes match);
    None: numpy writes a fresh header for :func:`_export_dtype`."""
    if recorded is None:
        return None
    header = NpyHeader.from_record(recorded)
    return header if header.shape == (num_images,) + source.item_shapes[kind.array] else None


def _export_dtype(kind: ArrayKind, stored: np.dtype) -> np.dtype:
    """The SCAN/3SHNet dtype of ``kind`` when the cache's values fit it exactly, else the cache's."""
    wanted = np.dtype(kind.export_dtype)
    return wanted if np.can_cast(stored, wanted, casting="safe") else stored


def _write_array(files: "_ShardFiles", source: _Source, kind: ArrayKind, header: NpyHeader | None, path: Path) -> None:
    shape = (len(source.shards),) + source.item_shapes[kind.array]
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if header is None:
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=_export_dtype(kind, source.dtypes[kind.array]), shape=shape)
        else:
            with open(tmp, "wb") as handle:
                handle.write(header.raw)
                handle.truncate(len(header.raw) + int(np.prod(shape, dtype=np.int64)) * header.dtype.itemsize)
            order = "F" if header.fortran_order else "C"
            target = np.memmap(tmp, dtype=header.dtype, mode="r+", offset=len(header.raw), shape=shape, order=order)
        step = rows_per_chunk(int(np.prod(shape[1:], dtype=np.int64)) * max(target.dtype.itemsize, source.dtypes[kind.array].itemsize))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            target[start:stop] = files.read(source.stage, kind.array, source.shards[start:stop], source.rows[start:stop])
        target.flush()
        del target
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _ShardFiles:
    """The shard files of a cache, each opened once while an export runs."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.open: dict[tuple[str, int], h5py.File] = {}

    def read(self, stage: str, name: str, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The arrays of the given (shard, row) pairs, in that order."""
        if (shards == shards[0]).all() and (np.diff(rows) == 1).all():  # the common case: consecutive rows of one shard
            return self._dataset(stage, int(shards[0]), name)[int(rows[0]) : int(rows[-1]) + 1]
        block = None
        for shard in np.unique(shards):
            at = np.flatnonzero(shards == shard)
            wanted, inverse = np.unique(rows[at], return_inverse=True)
            dataset = self._dataset(stage, int(shard), name)
            values = dataset[int(wanted[0]) : int(wanted[-1]) + 1] if wanted[-1] - wanted[0] == len(wanted) - 1 else dataset[wanted]
            if block is None:
                block = np.empty((len(shards),) + values.shape[1:], dtype=values.dtype)
            block[at] = values[inverse]
        return block

    def _dataset(self, stage: str, shard: int, name: str) -> h5py.Dataset:
        if (stage, shard) not in self.open:
            self.open[(stage, shard)] = self.cache.open_arrays(stage, shard)
        return self.open[(stage, shard)][name]

    def __enter__(self) -> "_ShardFiles":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.open.values():
            handle.close()
        self.open = {}
