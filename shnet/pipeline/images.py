"""Find the images under one or more folders, and decode any of them robustly into upright RGB."""

from __future__ import annotations

import heapq
import itertools
import os
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from shnet.errors import ImageDecodeError, ShnetError
from shnet.fileio import refuse_control_characters, terminal_safe

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# What Pillow raises for damaged pixel data (truncated streams, bad chunks, bad compression).
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


def discover_images(roots: list[str | Path]) -> pd.DataFrame:
    """Every image file under ``roots``, one row per file, sorted by ``image_id``.

    Columns: ``image_id`` (path relative to its root, POSIX separators, no extension), ``root``
    and ``path`` (absolute), ``bytes``. Symbolic links are followed, each real directory is walked
    once (so link cycles end), and hidden files and directories are skipped.
    """
    checked = checked_roots(roots)
    rows = sorted(row for root in checked for row in _walk_root(root))
    if not rows:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ShnetError(
            f"no images found in {', '.join(checked)} (looked for {extensions}, "
            "skipping hidden files and folders)"
        )
    _refuse_duplicate_ids(rows)
    return pd.DataFrame(rows, columns=["image_id", "root", "path", "bytes"])


def checked_roots(roots) -> list[str]:
    """The image folders as absolute paths, after refusing missing, non-folder and overlapping ones."""
    checked = [_checked_root(root) for root in roots]
    if not checked:
        raise ShnetError("no image folders given: name at least one folder to extract")
    _refuse_overlapping_roots(checked)
    return checked


def _checked_root(root: str | Path) -> str:
    path = os.path.abspath(os.path.expanduser(root))
    if not os.path.exists(path):
        raise ShnetError(f"image folder {path} does not exist")
    if not os.path.isdir(path):
        raise ShnetError(f"image folder {path} is not a directory")
    return path


def _refuse_overlapping_roots(roots: list[str]) -> None:
    """A root inside another would list its images twice, under two different image_ids."""
    real = [Path(os.path.realpath(root)) for root in roots]
    for i, j in itertools.combinations(range(len(roots)), 2):
        if real[i] == real[j] or real[i] in real[j].parents or real[j] in real[i].parents:
            raise ShnetError(
                f"image folders {roots[i]} and {roots[j]} overlap (one is the other or inside "
                "it): give each folder once"
            )


def _walk_root(root: str) -> Iterator[tuple[str, str, str, int]]:
    """Yield (image_id, root, path, bytes) for each image file under root.

    Directories are expanded in order of (symbolic links followed, relative path), and each real
    directory only once: a folder reachable both directly and through a link is listed under its
    direct path, and the result does not depend on the order the file system lists entries in.
    """
    pending = [(0, "", root)]
    expanded: set[tuple[int, int]] = set()
    while pending:
        links, rel_dir, abs_dir = heapq.heappop(pending)
        info = os.stat(abs_dir)
        if (info.st_dev, info.st_ino) in expanded:
            continue
        expanded.add((info.st_dev, info.st_ino))
        for entry in _list_dir(abs_dir, root):
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            kind = _entry_kind(entry)
            stem, extension = os.path.splitext(rel)
            if kind == "dir":
                heapq.heappush(pending, (links + entry.is_symlink(), rel, entry.path))
            elif extension.lower() in IMAGE_EXTENSIONS and kind in ("file", "broken link"):
                refuse_control_characters(stem, f"image file {terminal_safe(entry.path)}")
                yield stem, root, entry.path, entry.stat().st_size if kind == "file" else -1


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'broken link' (dangling or a loop: listed, so that the probe records it as a
    failed image) or 'other'."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:
        pass
    return "broken link" if entry.is_symlink() else "other"


def _list_dir(path: str, root: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError as exc:
        raise ShnetError(
            f"cannot list folder {path} under image folder {root} ({exc.strerror}): "
            "fix its permissions or move it out of the image folder"
        ) from exc


def _refuse_duplicate_ids(rows: list[tuple[str, str, str, int]]) -> None:
    clashes = [(a, b) for a, b in zip(rows, rows[1:]) if a[0] == b[0]]
    if clashes:
        first, second = clashes[0]
        more = f" ({len(clashes) - 1} more such pairs)" if len(clashes) > 1 else ""
        raise ShnetError(
            f"{first[2]} and {second[2]} both give image_id '{first[0]}'{more}; an image_id is "
            "the path relative to its folder without the extension, so it must be unique: "
            "rename one of the files, or extract the folders into separate caches"
        )


def decode_image(
    path: str | Path, *, max_pixels: int = 89_478_485, draft_size: int | None = None
) -> np.ndarray:
    """Decode an image file into an upright RGB ``uint8`` array of shape [H, W, 3].

    The EXIF orientation is applied; grayscale, palette, CMYK, 16-bit and float images are
    converted to 8-bit RGB; transparency is composited over white; multi-frame files give their
    first frame. With ``draft_size``, a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8) whose
    shorter side is still at least ``draft_size``, so the array can be smaller than the file's
    size. Raises ``ImageDecodeError`` for unreadable, empty, non-image, damaged files and for
    images of more than ``max_pixels`` pixels (checked from the header, before any decoding).
    """
    path = Path(path)
    with _open_image(path) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(_bomb_message(path, width, height, max_pixels))
        if draft_size is not None and isinstance(image, JpegImageFile):
            image.draft("RGB", (draft_size, draft_size))
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image, path)


def image_size(path: str | Path) -> tuple[int, int]:
    """The upright (width, height) of an image, read from its header without decoding pixels."""
    path = Path(path)
    with _open_image(path) as image:
        width, height = image.size
        if _header_orientation(image) in _TRANSPOSED_ORIENTATIONS:
            return height, width
        return width, height


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """Open ``path`` with Pillow; any failure while using it becomes an ``ImageDecodeError``."""
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ImageDecodeError(f"cannot decode image {path}: the file is empty (0 bytes)")
        try:
            with Image.open(file) as image:
                yield image
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(
                f"cannot decode image {path}: not an image, or a format Pillow cannot read"
            ) from exc
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(
                f"cannot decode image {path}: refused as a possible decompression bomb ({exc})"
            ) from exc
        except _CORRUPT_DATA_ERRORS as exc:
            raise ImageDecodeError(
                f"cannot decode image {path}: truncated or corrupt image data ({exc})"
            ) from exc


def _bomb_message(path: Path, width: int, height: int, max_pixels: int) -> str:
    return (
        f"cannot decode image {path}: {width}x{height} = {width * height} pixels exceeds the "
        f"limit of {max_pixels} (decompression-bomb guard); raise max_pixels if it is genuine"
    )


def _header_orientation(image: Image.Image) -> int:
    # Image.getexif of the base class reads only what the header holds; PngImageFile.getexif
    # would decode the pixels to reach an eXIf chunk stored after them, so that one is read here.
    orientation = Image.Image.getexif(image).get(_ORIENTATION_TAG)
    if orientation is None and image.format == "PNG":
        orientation = _png_trailing_orientation(image.fp)
    return orientation or 1


def _png_trailing_orientation(file) -> int | None:
    """The orientation in an eXIf chunk after the pixel data, found by skipping chunk by chunk."""
    file.seek(8)
    while len(header := file.read(8)) == 8:
        length, kind = struct.unpack(">I4s", header)
        if kind == b"eXIf":
            exif = Image.Exif()
            exif.load(file.read(length))
            return exif.get(_ORIENTATION_TAG)
        if kind == b"IEND":
            return None
        file.seek(length + 4, os.SEEK_CUR)
    return None


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        gray = _deep_gray_to_uint8(image)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _over_white(np.asarray(image.convert("RGBA")))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as exc:
        raise ImageDecodeError(
            f"cannot decode image {path}: pixel mode {image.mode} cannot be converted to RGB"
        ) from exc


def _deep_gray_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit and 32-bit integer samples scale by the 16-bit range (65535 -> 255), rounding.

    Pillow gives 16-bit PNG, TIFF and PGM data as I;16* or I (PGM already rescaled to 0..65535).
    Integer data outside 0..65535 and float data outside 0..1 have no declared range, so their
    own minimum and maximum map to 0 and 255; float data inside 0..1 scales by 255.
    """
    samples = np.asarray(image)
    if image.mode != "F" and samples.min() >= 0 and samples.max() <= 65535:
        return ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    samples = samples.astype(np.float64)
    samples[~np.isfinite(samples)] = 0.0
    low, high = samples.min(), samples.max()
    if low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((samples - low) * scale).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA over a white background, rounding."""
    alpha = rgba[:, :, 3:].astype(np.uint32)
    color = rgba[:, :, :3].astype(np.uint32)
    return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
