"""The SCAN / 3SHNet precomputed ``.npy`` layout: which files a set holds, what each corresponds to
in a cache, and the files themselves kept byte for byte (a ``.npy`` header, a text file's line
endings), read memory-mapped and never unpickled.

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

Any subset of these files may be present. The published COCO loader strips each id line and joins
it to the features folder as a path, so an id with ``/`` lives in a subfolder; ids that would leave
the folder (empty, absolute, with ``..``) are refused before any file is read or written.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from ..cache.schema import CAT_ONEHOT, FEATURES, LAYOUT, REGIONS, SEG_CELLS, SEG_FEAT, SEG_MAP, SEG_MAP_SIZE
from ..errors import ShnetError
from ..fileio import atomic_path, atomic_write_bytes, refuse_control_characters

CHUNK_BYTES = 64 * 2**20  # the most array bytes read and written at once
SPLITS_TABLE = "splits.parquet"  # an imported cache: split, position, image_id, id_line (each split's image order), region_header
IMPORT_RECORD = "npy_import"  # cache.json key: source folder, per split its files' headers and text styles
DEFAULT_CAPTIONS_PER_IMAGE = 5
DEFAULT_FEATURES_DIR = "coco_region_features"
REGION_LAYOUTS = ("whole-split", "per-image")
EXAMPLES = 5  # how many offending names a message lists


def rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(int(row_bytes), 1))


# --- the files of a set ------------------------------------------------------------------------
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
    ArrayKind("ims", REGIONS, FEATURES, 3, "float32", "[N, boxes, channels] region features"),
    ArrayKind("segmentations", LAYOUT, SEG_FEAT, 4, "float32", f"[N, classes, {SEG_CELLS}, {SEG_CELLS}] segmentation features"),
    ArrayKind("seg_maps", LAYOUT, SEG_MAP, 3, "uint8", f"[N, {SEG_MAP_SIZE}, {SEG_MAP_SIZE}] class maps"),
    ArrayKind("cat_onehots", LAYOUT, CAT_ONEHOT, 2, "uint8", "[N, classes] class presence"),
)
KINDS = {kind.name: kind for kind in ARRAY_KINDS}
REGION_KIND = KINDS["ims"]
_ARRAY_FILE = re.compile(r"^(?P<split>.+)_(?P<kind>ims|segmentations|seg_maps|cat_onehots)\.npy$")
_TEXT_FILE = re.compile(r"^(?P<split>.+)_(?P<kind>caps|ids)\.txt$")


def array_file(folder: Path, split: str, kind: str) -> Path:
    return folder / f"{split}_{kind}.npy"


def text_file(folder: Path, split: str, kind: str) -> Path:
    return folder / f"{split}_{kind}.txt"


def region_file(folder: Path, image_id: str) -> Path:
    """Where the published loader looks for ``image_id``'s features."""
    return folder / f"{image_id}.npy"


@dataclass
class SplitFiles:
    split: str
    arrays: dict[str, Path] = field(default_factory=dict)  # kind name -> path
    caps: Path | None = None
    ids: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in (*self.arrays.values(), self.caps, self.ids) if p is not None]


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


# --- image ids ---------------------------------------------------------------------------------
def refuse_bad_ids(image_ids: Sequence[str], source) -> None:
    """An image id is a non-empty name without control characters (one line of {split}_ids.txt)."""
    for line, image_id in enumerate(image_ids, start=1):
        if not image_id:
            raise ShnetError(f"{source}: line {line} is an empty image id; every line names one image")
        refuse_control_characters(image_id, f"{source} line {line}")


def _leaves_folder(relative: str) -> bool:
    path = PurePosixPath(relative)
    return not relative or relative.endswith("/") or path.is_absolute() or ".." in path.parts or "\0" in relative


def check_features_dir(name: str) -> None:
    if _leaves_folder(name):
        raise ShnetError(f"--features-dir '{name}' is not a folder inside the set; give a relative name such as {DEFAULT_FEATURES_DIR}")


def check_region_ids(image_ids: Sequence[str], source: str, features_dir: str) -> None:
    """Refuse ids that name no file inside ``features_dir`` (the loader would read or write elsewhere)."""
    bad = [repr(image_id) for image_id in image_ids if _leaves_folder(image_id)]
    if bad:
        raise ShnetError(
            f"{source}: {len(bad)} image id(s) name no file inside {features_dir}/, e.g. {', '.join(bad[:EXAMPLES])}; "
            "per-image region features need ids that are relative paths without '..' (a '/' makes a subfolder)"
        )


# --- text files, byte for byte -----------------------------------------------------------------
@dataclass
class TextLines:
    """A text file's lines (without line ends) and how they were ended, to write it back exactly."""

    lines: list[str]
    newline: str = "\n"
    final_newline: bool = True

    @classmethod
    def read(cls, path: Path) -> "TextLines":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ShnetError(f"{path} is not UTF-8 text ({exc}); convert it with iconv -t utf-8") from None
        lines = text.split("\n")
        final = lines[-1] == ""
        if final:
            lines.pop()
        newline = "\r\n" if lines and all(line.endswith("\r") for line in lines) else "\n"
        if newline == "\r\n":
            lines = [line[:-1] for line in lines]
        return cls(lines, newline, final and bool(lines))

    def to_bytes(self) -> bytes:
        return (self.newline.join(self.lines) + (self.newline if self.final_newline and self.lines else "")).encode("utf-8")

    def style(self) -> dict:
        return {"newline": self.newline, "final_newline": self.final_newline}

    def write(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_bytes())


# --- .npy headers ------------------------------------------------------------------------------
@dataclass
class NpyHeader:
    """The header bytes of a ``.npy`` file and what they say (kept to write the file back exactly)."""

    raw: bytes
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype

    @classmethod
    def parse(cls, raw: bytes, source: str) -> "NpyHeader":
        try:
            shape, fortran_order, dtype = read_header_fields(io.BytesIO(raw))
        except ValueError as exc:
            raise ShnetError(f"{source} is not a readable .npy file: {exc}") from None
        return cls(raw, tuple(int(s) for s in shape), bool(fortran_order), np.dtype(dtype))

    @classmethod
    def read(cls, path: Path) -> "NpyHeader":
        """The header of the ``.npy`` file at ``path``, its data left unread."""
        with open(path, "rb") as handle:
            try:
                read_header_fields(handle)
            except ValueError as exc:
                raise ShnetError(f"{path} is not a readable .npy file: {exc}") from None
            size = handle.tell()
            handle.seek(0)
            return cls.parse(handle.read(size), str(path))

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def to_record(self) -> dict:
        return {
            "header": base64.b64encode(self.raw).decode("ascii"),
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "fortran_order": self.fortran_order,
        }

    @classmethod
    def from_record(cls, entry: dict) -> "NpyHeader":
        return cls.parse(base64.b64decode(entry["header"]), "the cache record")


def read_header_fields(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a ``.npy`` header (format 1.0 or 2.0), leaving ``handle``
    at the first data byte; ValueError when it is not one."""
    version = np.lib.format.read_magic(handle)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        raise ValueError(f"format version {version[0]}.{version[1]} (numeric arrays use 1.0 or 2.0)")
    return reader(handle)


def open_npy(path: Path) -> tuple[np.ndarray, NpyHeader]:
    """A memory map of a numeric ``.npy`` file (pickled/object arrays refused) and its header."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ShnetError(f"{path} is not a plain numeric .npy array ({exc}); shnet never unpickles files") from None
    except OSError as exc:
        raise ShnetError(f"{path} cannot be read as .npy: {exc}") from None
    if not isinstance(array, np.memmap) or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ShnetError(f"{path} holds {array.dtype} data; the precomputed sets hold numeric arrays")
    with open(path, "rb") as handle:
        header = NpyHeader.parse(handle.read(array.offset), str(path))
    return array, header


# --- per-image region files (the published COCO loader) ----------------------------------------
@dataclass
class RegionFiles:
    """One split's per-image files as an [N, width, D] array read file by file. An image's rows past
    its file's K are zeros, and K is its ``num_boxes``; ``width`` is the largest K of the import.
    :meth:`scan` checks every file's header first (missing, pickled, mis-shaped or truncated files
    refused by name) without reading data."""

    paths: list[Path]
    headers: list[NpyHeader]  # per image (files with the same header share one object)
    counts: np.ndarray  # K per image
    dtype: np.dtype  # holds every file's values exactly
    width: int
    dim: int

    @classmethod
    def scan(cls, folder: Path, image_ids: Sequence[str], ids_file: Path) -> "RegionFiles":
        """Every image's file checked by its header (no data read), in ``image_ids`` order."""
        check_region_ids(image_ids, str(ids_file), str(folder))
        distinct: dict[bytes, NpyHeader] = {}
        paths, headers = [], []
        for image_id in image_ids:
            path = region_file(folder, image_id)
            header = _region_header(path, image_id, ids_file)
            header = distinct.setdefault(header.raw, header)
            if headers and header.shape[1] != headers[0].shape[1]:
                raise ShnetError(
                    f"{path} holds {header.shape[1]}-d region features, {paths[0]} {headers[0].shape[1]}-d; "
                    f"every file of {ids_file.name} needs the same feature size"
                )
            paths.append(path)
            headers.append(header)
        counts = np.array([h.shape[0] for h in headers], dtype=np.int32)
        dtype = np.result_type(*{h.dtype for h in distinct.values()})
        return cls(paths, headers, counts, dtype, int(counts.max()), headers[0].shape[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.paths), self.width, self.dim)

    ndim = 3

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, select) -> np.ndarray:
        if isinstance(select, (int, np.integer)):
            return self[[int(select)]][0]
        positions = np.arange(len(self.paths))[select]
        block = np.zeros((len(positions), self.width, self.dim), dtype=self.dtype)
        for row, position in enumerate(positions):
            values = np.load(self.paths[position], mmap_mode="r", allow_pickle=False)
            if values.shape != self.headers[position].shape:
                raise ShnetError(f"{self.paths[position]} changed while it was imported; import again")
            block[row, : len(values)] = values
        return block


def _region_header(path: Path, image_id: str, ids_file: Path) -> NpyHeader:
    """The header of one image's file, refused by name when the file cannot be its region features."""
    try:
        header = NpyHeader.read(path)
    except FileNotFoundError:
        raise ShnetError(
            f"{path} is missing: {ids_file.name} lists '{image_id}'; add its region features there, or remove the id "
            "(with its captions and its rows of the other files)"
        ) from None
    except OSError as exc:
        raise ShnetError(f"{path} cannot be read: {exc}") from None
    if header.dtype.hasobject:
        raise ShnetError(f"{path} holds pickled objects; shnet never unpickles files, and region features are numeric arrays")
    if not (np.issubdtype(header.dtype, np.number) or header.dtype == np.bool_):
        raise ShnetError(f"{path} holds {header.dtype} data; region features are numeric")
    if len(header.shape) != 2 or header.shape[0] < 1:
        raise ShnetError(f"{path} has shape {list(header.shape)}; a per-image region file holds [K, D] features of K >= 1 regions")
    size = path.stat().st_size
    if size < len(header.raw) + header.data_bytes:
        raise ShnetError(f"{path} is truncated ({size} bytes, its header needs {len(header.raw) + header.data_bytes}); copy it again")
    return header


def write_region_file(path: Path, values: np.ndarray, header: NpyHeader | None) -> None:
    """One image's file, atomically. With ``header`` (an imported file's, describing ``values[:K]``)
    the file is that header and those rows in its dtype and order, byte for byte; without, ``values``
    as ``np.save`` writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as handle:  # one file per image: no fsync each
        if header is None:
            np.lib.format.write_array(handle, values, allow_pickle=False)
        else:
            handle.write(header.raw)
            rows = np.asarray(values[: header.shape[0]], dtype=header.dtype)
            handle.write(rows.tobytes(order="F" if header.fortran_order else "C"))
