"""The one reading layer for the files shnet reads: a library's exception becomes one message that
names the file, what is wrong with it and what to do (a :class:`UnreadableFileError`, which the
command line prints as one line), never a traceback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

from .errors import ShnetError

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
HASH_BLOCK = 1 << 20


class UnreadableFileError(ShnetError):
    """A file that is missing, cut short, not of its format, or holding the wrong structure."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "it does not exist"
    if isinstance(exc, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(exc, json.JSONDecodeError):
        return f"it is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); it may be cut short"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


@contextlib.contextmanager
def reading(path, what: str, fix: str, error: type[ShnetError] = UnreadableFileError):
    """Run the read of ``path`` (a ``what``: "cache record", "caption file", ...); any failure of the
    underlying library becomes one ``error`` naming the file and ending with ``fix``."""
    try:
        yield
    except ShnetError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError) as exc:
        raise error(f"cannot read {what} {path}: {_reason(exc)}; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow / pandas / h5py raise their own classes
        if type(exc).__module__.split(".")[0] not in ("pyarrow", "pandas", "h5py"):
            raise
        raise error(f"cannot read {what} {path}: {_reason(exc)}; {fix}") from None


def read_json(path, what: str, fix: str, error: type[ShnetError] = UnreadableFileError):
    with reading(path, what, fix, error):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def read_parquet(path, what: str, fix: str, error: type[ShnetError] = UnreadableFileError, **options):
    import pandas as pd

    with reading(path, what, fix, error):
        return pd.read_parquet(path, **options)


def open_h5(path, what: str, fix: str, error: type[ShnetError] = UnreadableFileError):
    import h5py

    with reading(path, what, fix, error):
        return h5py.File(path, "r")


def file_sha256(path) -> str:
    """The content hash a done marker vouches with, read block by block."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def has_control_characters(text: str) -> bool:
    return bool(_CONTROL.search(text))


def refuse_control_characters(name: str, source: str) -> str:
    """The one rule for image ids and split names read from files: no control characters (a
    newline in an id would break every one-id-per-line file written from it)."""
    if has_control_characters(str(name)):
        raise ShnetError(f"{source}: the name '{terminal_safe(name)}' holds a control character (newline, tab, escape ...); rename it")
    return name


def plain_name(name: str, what: str) -> str:
    """A name used as part of a file name (a split): no folders, no '..', no control characters."""
    refuse_control_characters(name, what)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ShnetError(f"{what}: '{terminal_safe(name)}' is not a plain name (no '/', '\\', '..'); use a name such as train, val or test")
    return name


def writable_destination(path, what: str) -> Path:
    """``path`` after checking that no existing parent of it is a file (checked before any work,
    so that a long run does not fail at its last step)."""
    path = Path(path).expanduser().absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ShnetError(f"cannot write {what} {path}: {parent} is a file, not a folder; choose another location")
            break
    return path


def terminal_safe(text, keep_newlines: bool = False) -> str:
    """``text`` with control characters (ESC, newlines, ...) written as escapes, so that a name read
    from a file can never drive the terminal; ``keep_newlines`` for shnet's own multi-line messages."""
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
