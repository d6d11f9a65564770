"""Saved similarity results: a plain ``.npy`` matrix, or the published 3SHNet/VSE results file.

The published ``evalrank(..., fold5=False, save_path=...)`` saves ``np.save(path, {'npts': npts,
'sims': sims})``: a pickled dict in a 0-d object ``.npy``, with ``npts`` the number of images of the
split and ``sims`` their float64 [npts, 5 * npts] image x caption similarities (image i's captions at
columns 5i..5i+4), the whole split (COCO: the 5K ``testall`` matrix, whose five diagonal 1000 x 5000
blocks its ``eval_ensemble(fold5=True)`` takes as the 1K folds). Its ``eval_ensemble`` loads such files
with ``np.load(path, allow_pickle=True).tolist()``, requires equal ``npts`` and averages ``sims``.

shnet reads those files without running their pickles: the header is read with numpy's format
module, and the payload by an unpickler that builds only numpy arrays, dtypes and scalars; the
result must be exactly that dict. shnet writes the same dict, naming numpy's pickle helpers as
numpy 1.x does (``numpy.core.multiarray``), so both the published environment (numpy 1.21) and
numpy 2 load it, and streams the matrix into the file rather than pickling a copy of it.
"""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..npy_sets.format import read_header_fields
from ..errors import ShnetError
from ..fileio import atomic_open

SIMS_LAYOUTS = ("plain", "3shnet")
_KEYS = {"npts", "sims"}
_ROWS_PER_WRITE = 256


@dataclass
class SavedSimilarities:
    sims: np.ndarray  # images x captions
    npts: int | None  # the published file's image count (None: a plain matrix)


def read_similarities(path: Path) -> SavedSimilarities:
    """A plain numeric matrix or a published results dict, refused by name when it is neither."""
    try:
        with open(path, "rb") as handle:
            shape, _, dtype = _header(handle, path)
            if not dtype.hasobject:
                return SavedSimilarities(_plain(path, dtype), None)
            if shape != ():
                raise ShnetError(f"{path} holds an object array of shape {shape}; a results file holds one dict {{'npts', 'sims'}}")
            return _published(_NumpyOnlyUnpickler(handle).load_checked(path), path)
    except OSError as exc:
        raise ShnetError(f"{path} cannot be read: {exc}") from None


def _header(handle, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        return read_header_fields(handle)
    except ValueError as exc:
        raise ShnetError(f"{path} is not a .npy similarity matrix or results file ({exc})") from None


def _plain(path: Path, dtype: np.dtype) -> np.ndarray:
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise ShnetError(f"{path} holds {dtype} values; a similarity matrix is numeric")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _published(loaded: object, path: Path) -> SavedSimilarities:
    """The dict of a published results file, checked: exactly 'npts' (an int) and 'sims' (a numeric
    matrix with npts rows)."""
    results = loaded.item() if isinstance(loaded, np.ndarray) and loaded.shape == () and loaded.dtype.hasobject else None
    if not isinstance(results, dict) or set(results) != _KEYS:
        found = sorted(map(str, results)) if isinstance(results, dict) else type(results).__name__
        raise ShnetError(f"{path} holds {found}; a published results file holds a dict of exactly 'npts' and 'sims'")
    npts, sims = results["npts"], results["sims"]
    if isinstance(npts, bool) or not isinstance(npts, (int, np.integer)):
        raise ShnetError(f"{path}: 'npts' is {npts!r}; it is the number of images, an integer")
    if not isinstance(sims, np.ndarray) or not np.issubdtype(sims.dtype, np.number) or sims.ndim != 2:
        described = f"{sims.dtype} array of shape {sims.shape}" if isinstance(sims, np.ndarray) else type(sims).__name__
        raise ShnetError(f"{path}: 'sims' is a {described}; it is a numeric images x captions matrix")
    if sims.shape[0] != npts:
        raise ShnetError(f"{path}: 'npts' is {int(npts)} but 'sims' has {sims.shape[0]} image rows; the file is inconsistent")
    return SavedSimilarities(sims, int(npts))


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only names a results pickle may load: what rebuilds an ndarray, a dtype or a numpy
    scalar, under numpy 1.x's and numpy 2's module names, resolved in the installed numpy."""
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array, dtype and scalar builders, so no pickled code runs."""

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it asks to load {module}.{name}")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it refers to outside objects")

    def load_checked(self, path: Path) -> object:
        try:
            return self.load()
        except Exception as exc:  # a hostile or damaged payload may fail in any way; none of it is run
            raise ShnetError(
                f"{path} is not a published results file shnet can read ({exc}); shnet reads only a pickled dict of "
                "'npts' and 'sims' made of numpy arrays and numbers, and never runs other pickled code"
            ) from None


def write_published(path: Path, sims: np.ndarray) -> None:
    """``sims`` as the published ``np.save(path, {'npts': npts, 'sims': sims})`` holds it, sims in float64."""
    rows, columns = sims.shape
    body = _ndarray_start() + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.EMPTY_TUPLE + _dtype("O8", "|", 63)
    body += pickle.NEWFALSE + pickle.EMPTY_LIST + pickle.EMPTY_DICT + pickle.MARK
    body += _text("npts") + _int(rows) + _text("sims") + _ndarray_start()
    body += pickle.MARK + pickle.BININT1 + b"\x01" + _int(rows) + _int(columns) + pickle.TUPLE2 + _dtype("f8", "<", 0) + pickle.NEWFALSE
    body += pickle.BINBYTES8 + struct.pack("<Q", rows * columns * 8)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    with atomic_open(path) as handle:
        handle.write(header.getvalue() + pickle.PROTO + b"\x04" + body)
        for start in range(0, rows, _ROWS_PER_WRITE):
            handle.write(np.ascontiguousarray(sims[start : start + _ROWS_PER_WRITE], dtype="<f8").tobytes())
        handle.write(pickle.TUPLE + pickle.BUILD + pickle.SETITEMS + pickle.APPEND + pickle.TUPLE + pickle.BUILD + pickle.STOP)


def _ndarray_start() -> bytes:
    """``_reconstruct(ndarray, (0,), b'b')``: an empty array that the following state fills."""
    return (
        pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + pickle.GLOBAL + b"numpy\nndarray\n"
        + pickle.BININT1 + b"\x00" + pickle.TUPLE1 + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE3 + pickle.REDUCE
    )


def _dtype(code: str, byteorder: str, flags: int) -> bytes:
    """``numpy.dtype(code, False, True)`` with its pickled state, as numpy writes it."""
    state = pickle.MARK + pickle.BININT1 + b"\x03" + _text(byteorder) + pickle.NONE * 3 + _int(-1) + _int(-1) + _int(flags) + pickle.TUPLE
    return pickle.GLOBAL + b"numpy\ndtype\n" + _text(code) + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3 + pickle.REDUCE + state + pickle.BUILD


def _text(value: str) -> bytes:
    data = value.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)
