"""The shard cache on disk: layout, atomic shard commits, the cache record and its readers.

Layout of one cache directory::

    cache.json                  format version, image roots, shard plan, each stage's config
    images.parquet              one row per image: image_id, path, width, height, bytes, shard, row,
                                status (ok / error / pending), error
    .lock                       held (flock) by the one extract that may write the cache
    logs/extract-errors.log     full tracebacks of failed shard attempts (the terminal shows one line)
    <stage>/00000.h5            arrays of shard 0: one dataset per output, first axis = row
    <stage>/table/00000.parquet one row per image of shard 0: image_id, row, status, error,
                                seconds and the stage's scalars
    <stage>/<name>/00000.parquet a stage's further tables (e.g. panoptic/segments: many rows per image)
    <stage>/00000.done          written last: the shard is complete

Read every shard's table of a stage as one frame with ``pd.read_parquet("<cache>/<stage>/table")``
(and a further table with ``pd.read_parquet("<cache>/<stage>/<name>")``).

A shard is written under temporary names, flushed and renamed into place, and only then gets its
done marker; a reader that goes by done markers never sees a partial shard, and an interrupted
writer leaves only ``*.tmp-*`` files, which the next extract removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np
import pandas as pd

from ..errors import CacheError
from ..fileio import (
    DirectoryLock,
    atomic_write_json,
    atomic_write_parquet,
    file_sha256,
    open_h5,
    publish,
    read_json,
    read_parquet,
    remove_stale_temporaries,
    temporary_name,
)

REPAIR_HINT = "see README 'Repairing a damaged cache'"
SIGNATURES = {".h5": (b"\x89HDF\r\n\x1a\n", b""), ".parquet": (b"PAR1", b"PAR1")}
FORMAT_VERSION = 1
CACHE_RECORD = "cache.json"
IMAGES_TABLE = "images.parquet"
LOCK_FILE = DirectoryLock.FILE
ERROR_LOG = "logs/extract-errors.log"
LIBRARY_LOG = "logs/dask-workers.log"
IMAGE_COLUMNS = ["image_id", "path", "width", "height", "bytes", "shard", "row", "status", "error"]


def shard_stem(shard: int) -> str:
    return f"{shard:05d}"


def config_hash(config: Mapping) -> str:
    """A short stable digest of a JSON-able config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Cache:
    """Read access to a cache directory (and the small record updates the runner makes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        record = self.root / CACHE_RECORD
        if not record.exists():
            raise CacheError(f"{self.root} is not a shnet cache (no {CACHE_RECORD}); create one with `shnet extract IMAGE_DIR -o {self.root}`")
        self.record = read_json(record, "the cache record", f"restore it from a backup or extract into a new -o directory ({REPAIR_HINT})", CacheError)
        if not isinstance(self.record, dict):
            raise CacheError(f"cannot read the cache record {record}: it is not a JSON object; restore it from a backup or extract into a new -o directory")
        version = self.record.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{self.root} has cache format {version}, this shnet reads format {FORMAT_VERSION}; "
                "re-extract it or use the shnet version that wrote it"
            )

    # --- the record ---------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return int(self.record["num_shards"])

    @property
    def shard_size(self) -> int:
        return int(self.record["shard_size"])

    def stage_config(self, stage: str) -> dict | None:
        entry = self.record.get("stages", {}).get(stage)
        return None if entry is None else entry["config"]

    def recorded_stages(self) -> list[str]:
        return sorted(self.record.get("stages", {}))

    def save_record(self) -> None:
        atomic_write_json(self.root / CACHE_RECORD, self.record)

    @staticmethod
    def error_log_path(root: str | Path) -> Path:
        """Where extract workers append the full traceback of every failed shard attempt."""
        return Path(root) / ERROR_LOG

    @staticmethod
    def library_log_path(root: str | Path) -> Path:
        """Where the embedded cluster's workers append Dask's own log records."""
        return Path(root) / LIBRARY_LOG

    # --- images -------------------------------------------------------------------------------
    def images(self) -> pd.DataFrame:
        path = self.root / IMAGES_TABLE
        return read_parquet(path, "the image table", f"restore it from a backup or extract into a new -o directory ({REPAIR_HINT})", CacheError)

    # --- stages -------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def array_path(self, stage: str, shard: int) -> Path:
        return self.stage_dir(stage) / f"{shard_stem(shard)}.h5"

    def table_path(self, stage: str, shard: int, table: str = "table") -> Path:
        return self.stage_dir(stage) / table / f"{shard_stem(shard)}.parquet"

    def done_path(self, stage: str, shard: int) -> Path:
        return self.stage_dir(stage) / f"{shard_stem(shard)}.done"

    def is_done(self, stage: str, shard: int) -> bool:
        return self.done_path(stage, shard).exists()

    def done_shards(self, stage: str) -> list[int]:
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob("*.done") if p.stem.isdigit())

    def is_stage_complete(self, stage: str) -> bool:
        return len(self.done_shards(stage)) == self.num_shards

    def done_marker(self, stage: str, shard: int) -> dict:
        return read_json(self.done_path(stage, shard), "the done marker", self.redo_hint(stage, shard), CacheError)

    def is_readable_marker(self, stage: str, shard: int) -> bool:
        try:
            return isinstance(self.done_marker(stage, shard), dict)
        except CacheError:
            return False

    def redo_hint(self, stage: str, shard: int) -> str:
        return f"delete {self.done_path(stage, shard)} and re-run `shnet extract` to redo that shard ({REPAIR_HINT})"

    def shard_problem(self, stage: str, shard: int, content: bool = False) -> str | None:
        """What is wrong with a done shard, or None: its files present with the sizes (and, with
        ``content``, the sha256) its marker vouches for; a marker without them (an older shnet)
        vouches for the files' presence and format signatures only."""
        if not self.is_readable_marker(stage, shard):
            return "its done marker is unreadable"
        files = self.done_marker(stage, shard).get("files")
        if not isinstance(files, dict):
            files = {p.relative_to(self.stage_dir(stage)).as_posix(): {} for p in (self.array_path(stage, shard), self.table_path(stage, shard))}
        for name, vouched in files.items():
            problem = file_problem(self.stage_dir(stage) / name, vouched, content)
            if problem:
                return f"{name} {problem}"
        return None

    def damaged_shards(self, stage: str) -> dict[int, str]:
        """Done shards of ``stage`` whose files fail the cheap check (presence, sizes, signatures)."""
        found = {shard: self.shard_problem(stage, shard) for shard in self.done_shards(stage)}
        return {shard: problem for shard, problem in found.items() if problem}

    def stage_table(self, stage: str, table: str = "table") -> pd.DataFrame:
        """Every committed shard's table of ``stage`` (or its further table ``table``) as one frame,
        in image order."""
        shards = self.done_shards(stage)
        if not shards:
            raise CacheError(f"stage '{stage}' has no complete shard in {self.root}; run `shnet extract ... --stages {stage}`")
        frames = [self.shard_table(stage, s, table) for s in shards]
        return pd.concat(frames, ignore_index=True)

    def shard_table(self, stage: str, shard: int, table: str = "table", columns: list[str] | None = None) -> pd.DataFrame:
        path = self.table_path(stage, shard, table)
        return read_parquet(path, f"the '{stage}' shard table", self.redo_hint(stage, shard), CacheError, columns=columns)

    def open_arrays(self, stage: str, shard: int) -> h5py.File:
        if not self.is_done(stage, shard):
            raise CacheError(f"shard {shard} of stage '{stage}' in {self.root} is not complete")
        return open_h5(self.array_path(stage, shard), f"the '{stage}' shard", self.redo_hint(stage, shard), CacheError)

    def read(self, stage: str, name: str, image_id: str) -> np.ndarray:
        """One image's array (convenient, not fast: opens the shard file for each call)."""
        images = self.images().set_index("image_id")
        if image_id not in images.index:
            raise CacheError(f"no image '{image_id}' in {self.root}")
        shard, row = int(images.at[image_id, "shard"]), int(images.at[image_id, "row"])
        with self.open_arrays(stage, shard) as h5:
            if name not in h5:
                raise CacheError(f"stage '{stage}' has no array '{name}' (it has: {', '.join(h5)})")
            return h5[name][row]

    def remove_stale_temporaries(self) -> int:
        """Delete ``*.tmp-*`` leftovers of interrupted writers; only call while holding the lock."""
        return remove_stale_temporaries(self.root)


def vouch(path: Path) -> dict:
    """What a done marker records of one of its shard's files."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def file_problem(path: Path, vouched: Mapping, content: bool = False) -> str | None:
    """What is wrong with ``path`` against what was ``vouched`` for it (bytes, sha256; ``content``:
    hash it), its format signature checked in any case; None when nothing is."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if "bytes" in vouched and size != vouched["bytes"]:
        return f"has {size} bytes, its done marker vouches for {vouched['bytes']} (cut short or rewritten)"
    head, tail = SIGNATURES.get(path.suffix, (b"", b""))
    with open(path, "rb") as fh:
        start = fh.read(len(head))
        fh.seek(max(0, size - len(tail)))
        end = fh.read(len(tail))
    if start != head or end != tail:
        return f"is not a {path.suffix} file (garbage or cut short)"
    if content and "sha256" in vouched and file_sha256(path) != vouched["sha256"]:
        return "content differs from what its done marker vouches for (sha256 mismatch: rewritten or corrupted)"
    return None


def create_cache(root: str | Path, images: pd.DataFrame, shard_size: int, roots: Iterable[str]) -> Cache:
    """Create the cache directory with its record and the planned ``images.parquet``.

    ``images`` has image_id, path, bytes (and optionally width/height/status/error), in the order
    that assigns shards: image i goes to shard i // shard_size, row i % shard_size.
    """
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    planned = plan_shards(images, shard_size)
    atomic_write_parquet(root / IMAGES_TABLE, planned)
    record = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "roots": [str(r) for r in roots],
        "shard_size": int(shard_size),
        "num_images": int(len(planned)),
        "num_shards": int(planned["shard"].max() + 1) if len(planned) else 0,
        "image_list_sha256": image_list_digest(planned["image_id"]),
        "stages": {},
    }
    atomic_write_json(root / CACHE_RECORD, record)
    return Cache(root)


def plan_shards(images: pd.DataFrame, shard_size: int) -> pd.DataFrame:
    if shard_size < 1:
        raise CacheError(f"--shard-size must be at least 1 (got {shard_size})")
    frame = images.reset_index(drop=True).copy()
    index = np.arange(len(frame))
    frame["shard"] = (index // shard_size).astype(np.int32)
    frame["row"] = (index % shard_size).astype(np.int32)
    for column, default in (("width", -1), ("height", -1), ("bytes", -1), ("status", "pending"), ("error", "")):
        if column not in frame:
            frame[column] = default
    frame["path"] = frame["path"].astype(str) if "path" in frame else ""
    return frame[IMAGE_COLUMNS + [c for c in frame.columns if c not in IMAGE_COLUMNS]]


def image_list_digest(image_ids: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for image_id in image_ids:
        digest.update(image_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class ShardWriter:
    """Writes one (stage, shard): arrays streamed into a temporary HDF5 file, then committed.

    Use as a context manager: an exception aborts (the temporary file is removed and nothing
    becomes visible); :meth:`commit` publishes arrays, then the table, then the done marker.
    """

    def __init__(self, cache: Cache, stage: str, shard: int, num_rows: int, attrs: Mapping):
        self.cache, self.stage, self.shard, self.num_rows = cache, stage, shard, num_rows
        cache.stage_dir(stage).joinpath("table").mkdir(parents=True, exist_ok=True)
        self.final = cache.array_path(stage, shard)
        self.tmp = temporary_name(self.final)
        self.h5 = h5py.File(self.tmp, "w")
        for key, value in attrs.items():
            self.h5.attrs[key] = value if isinstance(value, (int, float, str, np.ndarray)) else json.dumps(value, default=str)
        self.h5.attrs["stage"] = stage
        self.h5.attrs["shard"] = shard
        self.h5.attrs["num_rows"] = num_rows
        self.further_tables: dict[str, pd.DataFrame] = {}
        self.committed = False

    def create(self, name: str, item_shape: tuple, dtype, fill=0) -> h5py.Dataset:
        """A dataset [num_rows, *item_shape], chunked one image per chunk (small items grouped)."""
        item_shape = tuple(int(s) for s in item_shape)
        item_bytes = int(np.prod(item_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        rows_per_chunk = max(1, min(self.num_rows, (64 * 1024) // max(item_bytes, 1))) if item_bytes < 16 * 1024 else 1
        chunks = (max(1, min(rows_per_chunk, self.num_rows)),) + item_shape if self.num_rows else None
        return self.h5.create_dataset(
            name, shape=(self.num_rows,) + item_shape, dtype=dtype, chunks=chunks, fillvalue=fill
        )

    def write(self, name: str, rows, values) -> None:
        self.h5[name][rows] = values

    def add_table(self, name: str, frame: pd.DataFrame) -> None:
        """A further table of this shard (any number of rows per image, e.g. one per segment),
        published as ``<stage>/<name>/NNNNN.parquet`` at commit, before the done marker."""
        if name == "table":
            raise CacheError("internal: 'table' is the stage's own per-image table; name a further table otherwise")
        self.further_tables[name] = frame.assign(shard=np.int32(self.shard))

    def commit(self, table: pd.DataFrame, summary: Mapping | None = None) -> None:
        if len(table) != self.num_rows:
            raise CacheError(f"internal: shard {self.shard} of '{self.stage}' has {len(table)} table rows for {self.num_rows} array rows")
        table = table.assign(shard=np.int32(self.shard))
        self.h5.flush()
        self.h5.close()
        publish(self.tmp, self.final)
        for name, frame in self.further_tables.items():
            self.cache.table_path(self.stage, self.shard, name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_parquet(self.cache.table_path(self.stage, self.shard, name), frame)
        atomic_write_parquet(self.cache.table_path(self.stage, self.shard), table)
        tables = [self.cache.table_path(self.stage, self.shard, name) for name in ("table", *self.further_tables)]
        marker = {
            "files": {p.relative_to(self.cache.stage_dir(self.stage)).as_posix(): vouch(p) for p in (self.final, *tables)},
            "stage": self.stage,
            "shard": self.shard,
            "rows": self.num_rows,
            "ok": int((table["status"] == "ok").sum()),
            "errors": int((table["status"] == "error").sum()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **dict(summary or {}),
        }
        atomic_write_json(self.cache.done_path(self.stage, self.shard), marker)
        self.committed = True

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.h5.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.committed:
            self.abort()


class CacheLock(DirectoryLock):
    """The extract's exclusive, process-lifetime lock on a cache (released by the OS if the process dies)."""

    def __init__(self, root: str | Path):
        super().__init__(root, "shnet extract", CacheError)


def stage_config_recorded(cache: Cache, stage: str, config: Mapping, location_keys: Iterable[str] = ()) -> bool:
    """Whether the cache already records ``stage`` with this config (False: not recorded yet);
    refuses when it records another config.

    ``location_keys`` (e.g. a weights path, whose content is identified by its sha256 instead) do
    not take part in the comparison.
    """
    existing = cache.record.get("stages", {}).get(stage)
    if existing is None:
        return False
    if existing["config_hash"] != _stage_config_hash(config, location_keys):
        raise CacheError(config_mismatch_message(cache.root, stage, existing["config"], dict(config)))
    return True


def record_stage_config(cache: Cache, stage: str, config: Mapping, location_keys: Iterable[str] = ()) -> None:
    """Record ``stage``'s config in the cache, or refuse if the cache holds it with another config."""
    if not stage_config_recorded(cache, stage, config, location_keys):
        cache.record.setdefault("stages", {})[stage] = {"config": dict(config), "config_hash": _stage_config_hash(config, location_keys)}
        cache.save_record()


def _stage_config_hash(config: Mapping, location_keys: Iterable[str]) -> str:
    skip = set(location_keys)
    return config_hash({k: v for k, v in config.items() if k not in skip})


def config_mismatch_message(root: Path, stage: str, old: Mapping, new: Mapping) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"  {stage}.{k}: cache has {old.get(k)!r}, this run asks for {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return (
        f"stage '{stage}' in {root} was extracted with a different config:\n" + "\n".join(diffs) + "\n"
        "Refusing to mix them in one cache: extract into a new -o directory, or re-run with the cache's settings."
    )


def write_stage(
    cache_root: str | Path,
    stage: str,
    image_ids: list[str],
    arrays: Mapping[str, np.ndarray],
    config: Mapping,
    table: Mapping[str, Iterable] | None = None,
    shard_size: int = 1000,
    attrs: Mapping | None = None,
) -> Cache:
    """Write a whole stage from in-memory arrays (``shnet import``, tests, synthetic caches).

    Creates the cache (images without files: empty ``path``, status ok) when it does not exist;
    otherwise ``image_ids`` must be the cache's images in its order. ``arrays`` map names to
    [N, ...] arrays; ``table`` holds extra per-image scalar columns.
    """
    root = Path(cache_root).expanduser().resolve()
    if (root / CACHE_RECORD).exists():
        cache = Cache(root)
        if list(cache.images()["image_id"]) != list(image_ids):
            raise CacheError(f"{root} holds other images than the ones given for stage '{stage}'")
    else:
        frame = pd.DataFrame({"image_id": list(image_ids), "path": "", "bytes": -1, "status": "ok", "error": ""})
        cache = create_cache(root, frame, shard_size, roots=[])
    record_stage_config(cache, stage, config)
    images = cache.images()
    extra = pd.DataFrame(dict(table or {}))
    for shard, part in images.groupby("shard", sort=True):
        idx = part.index.to_numpy()
        with ShardWriter(cache, stage, int(shard), len(idx), {"config": dict(config), **dict(attrs or {})}) as writer:
            for name, values in arrays.items():
                values = np.asarray(values)
                writer.create(name, values.shape[1:], values.dtype)
                writer.write(name, slice(0, len(idx)), values[idx])
            shard_table = pd.DataFrame(
                {"image_id": part["image_id"].to_numpy(), "row": part["row"].to_numpy(), "status": "ok", "error": "", "seconds": 0.0}
            )
            for column in extra.columns:
                shard_table[column] = extra[column].to_numpy()[idx]
            writer.commit(shard_table)
    return cache
