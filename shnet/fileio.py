"""The one file layer: reading (a library's exception on any file shnet reads becomes one message
that names the file, what is wrong with it and what to do, a :class:`UnreadableFileError` that the
command line prints as one line, never a traceback) and writing (atomic replace under one
temporary-name scheme, the stale-temporary sweep, the one-writer directory lock)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Iterator

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


_CONTENT_SHA256: dict[tuple[str, int, int], str] = {}


def content_sha256(path) -> str:
    """sha256 of a file, or of every file of a folder in name order (what identifies weights, a
    model folder or a boxes file in a config); memoised per (path, newest mtime, total size)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    key = (str(path), max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats))
    if key not in _CONTENT_SHA256:
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(HASH_BLOCK), b""):
                    digest.update(block)
        _CONTENT_SHA256[key] = digest.hexdigest()
    return _CONTENT_SHA256[key]


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


# --- writing: one temporary-name scheme, atomic replace, the directory lock ----------------------
#
# Every file shnet writes appears complete or not at all: it is written under ``NAME.tmp-<hex>``
# in the target's folder (a name unique to this writer, so two writers never share one), flushed
# to disk and renamed over the target. An interrupted writer leaves only ``*.tmp-*`` files, which
# :func:`remove_stale_temporaries` sweeps while the folder's :class:`DirectoryLock` is held.

TEMPORARY_MARK = ".tmp-"
TEMPORARY_GLOB = f"*{TEMPORARY_MARK}*"


def temporary_name(path) -> Path:
    """A name beside ``path`` that no other writer uses: ``NAME.tmp-<16 hex>``."""
    path = Path(path)
    return path.with_name(f"{path.name}{TEMPORARY_MARK}{secrets.token_hex(8)}")


def publish(tmp, path) -> None:
    """Flush the finished temporary file ``tmp`` to disk and rename it to ``path`` (for a writer
    whose temporary file outlives one block, e.g. an HDF5 shard written over many calls)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path, durable: bool = True) -> Iterator[Path]:
    """A temporary filename for a writer that needs one (h5py, torch.save, savefig, faiss ...);
    on a clean exit the file is flushed to disk (``durable``) and renamed to ``path``, on an error
    it is removed and ``path`` is untouched.

    The temporary name does not end in ``path``'s suffix: give writers that infer the format from
    the name the format (``savefig(..., format="png")``), or use :func:`atomic_open` (``np.save``
    appends ``.npy`` to a name without it)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            publish(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """An open file (``wb`` or ``w``) that becomes ``path`` when the block ends without error."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes a new file: mode 'wb' or 'w', not {mode!r}")
    with atomic_path(path, durable=False) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path, obj, indent: int | None = 2) -> None:
    """``obj`` as JSON (keys sorted, one trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path, frame, **options) -> None:
    """A pandas frame (without its index), or an Arrow table (for types pandas cannot express, e.g.
    fixed-size lists); ``options`` go to the Parquet writer (compression, use_dictionary, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        if isinstance(frame, pa.Table):
            pq.write_table(frame, tmp, **options)
        else:
            frame.to_parquet(tmp, index=False, **options)


def atomic_copy(source, target) -> None:
    """``source``'s bytes as ``target``, which is replaced whole or left as it was."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def remove_stale_temporaries(root) -> int:
    """Delete the ``*.tmp-*`` leftovers of interrupted writers under ``root`` (only while holding
    its :class:`DirectoryLock`, so that no live writer's file goes); returns how many went."""
    removed = 0
    for path in Path(root).rglob(TEMPORARY_GLOB):
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


class DirectoryLock:
    """An exclusive lock on a folder that one command writes at a time (``flock`` on ``.lock``,
    released by the OS if the process dies). A second writer is refused at once with an ``error``
    naming the ``command`` that holds it and its holder (pid, host, since)."""

    FILE = ".lock"

    def __init__(self, root, command: str, error: type[ShnetError] = ShnetError):
        self.root = Path(root)
        self.path = self.root / self.FILE
        self.command, self.error = command, error
        self.fh = None

    def acquire(self) -> "DirectoryLock":
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = terminal_safe(fh.read().strip()) or "another process"
            fh.close()
            raise self.error(
                f"{self.root} is being written by another `{self.command}` ({holder}); "
                "wait for it to finish (one writer at a time)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
