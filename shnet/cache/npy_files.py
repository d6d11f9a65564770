""".npy and text files read and written byte for byte: what an import records so that export
writes the same bytes (a ``.npy`` header, a text file's line endings), and memory-mapped reading
that never unpickles."""

from __future__ import annotations

import base64
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ShnetError


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


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
