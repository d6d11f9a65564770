"""The published COCO loader's region features: one ``{features_dir}/ID.npy`` ([K, 2048]) per line
ID of ``{split}_ids.txt`` instead of a whole-split ``{split}_ims.npy``.

The loader strips each id line and joins it to the folder as a path, so an id with ``/`` lives in
a subfolder. Ids that would leave the folder (empty, absolute, with ``..``) are refused before any
file is read or written. Import checks every file's header first (missing, pickled, mis-shaped or
truncated files refused by name) and then reads the files block by block; export writes one file per
image, with an imported file's own header when the cache recorded one, so the bytes come back.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from ..errors import ShnetError
from .npy_files import NpyHeader

DEFAULT_FEATURES_DIR = "coco_region_features"
REGION_LAYOUTS = ("whole-split", "per-image")
_EXAMPLES = 5


def region_file(folder: Path, image_id: str) -> Path:
    """Where the published loader looks for ``image_id``'s features."""
    return folder / f"{image_id}.npy"


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
            f"{source}: {len(bad)} image id(s) name no file inside {features_dir}/, e.g. {', '.join(bad[:_EXAMPLES])}; "
            "per-image region features need ids that are relative paths without '..' (a '/' makes a subfolder)"
        )


@dataclass
class RegionFiles:
    """One split's per-image files as an [N, width, D] array read file by file. An image's rows past
    its file's K are zeros, and K is its ``num_boxes``; ``width`` is the largest K of the import."""

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
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            if header is None:
                np.lib.format.write_array(handle, values, allow_pickle=False)
            else:
                handle.write(header.raw)
                rows = np.asarray(values[: header.shape[0]], dtype=header.dtype)
                handle.write(rows.tobytes(order="F" if header.fortran_order else "C"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
