"""The embedding store on disk: Parquet shards of embeddings and the record of where they came from.

Layout of one store directory (``shnet encode RUN --cache CACHE -o EMB``)::

    embeddings.json            format, the run (checkpoint path, sha256, epoch), caches, dtype,
                               dimension, shard plan and row counts of each part
    images/00000.parquet       image_id, path, embedding (fixed_size_list<float32|float16>[D])
    captions/00000.parquet     caption_id, image, image_id, split, caption, embedding
    index/images.faiss         the approximate index (``--index``) and index/index.json, its record
    .lock                      held (flock) by the one encode that may write the store

A shard is written under a temporary name and renamed into place, so a shard file that exists is
complete; an interrupted encode leaves only ``*.tmp-*`` files, removed by the next one.
Read a part as one frame with ``pd.read_parquet("EMB/images")``; :func:`embedding_matrix` turns
the ``embedding`` column into an [N, D] array.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..cache.store import atomic_write_json, atomic_write_parquet, file_problem, shard_stem
from ..errors import ShnetError
from ..fileio import read_json, reading

FORMAT = "shnet-embeddings"
FORMAT_VERSION = 1
RECORD = "embeddings.json"
PARTS = ("images", "captions")
DTYPES = ("float32", "float16")
_ARROW_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
# Embeddings do not compress and dictionary encoding only slows them: plain pages read 2-3x faster;
# row groups of 32768 rows let a reader stream a shard without holding all of it.
SHARD_WRITE_OPTIONS = {"compression": "none", "use_dictionary": False, "row_group_size": 32768}


def embedding_column(embeddings: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """[N, D] floats -> a fixed-size list column of ``dtype``."""
    values = np.ascontiguousarray(embeddings, dtype=np.dtype(dtype)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values, type=_ARROW_TYPES[dtype]), embeddings.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """A fixed-size list column -> [N, D] numpy array of its stored dtype (no copy for one chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


@dataclass
class Chunk:
    """Consecutive rows of a part: ``start`` is the global row of ``embeddings[0]``."""

    start: int
    embeddings: np.ndarray


class EmbeddingStore:
    """Read and write access to one store directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    # --- the record ---------------------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        return self.root / RECORD

    def exists(self) -> bool:
        return self.record_path.exists()

    def record(self) -> dict:
        if not self.exists():
            raise ShnetError(f"{self.root} is not an embedding store (no {RECORD}); create one with `shnet encode RUN --cache CACHE -o {self.root}`")
        record = read_json(self.record_path, "the embedding record", "re-run `shnet encode` into a new -o folder")
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("format_version", 0) > FORMAT_VERSION:
            raise ShnetError(f"{self.record_path}: not a shnet embedding record this version reads (format {record.get('format')!r} v{record.get('format_version')})")
        return record

    def save_record(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_path, record)

    def part(self, part: str) -> dict:
        """The record's entry for ``images`` or ``captions``; refuses when that part was not encoded."""
        entry = self.record().get(part)
        if entry is None:
            what = "--captions FILE" if part == "captions" else "--cache CACHE"
            raise ShnetError(f"{self.root} holds no {part} embeddings; encode them with `shnet encode RUN {what} -o {self.root}`")
        return entry

    # --- shards -------------------------------------------------------------------------------
    def shard_path(self, part: str, shard: int) -> Path:
        return self.root / part / f"{shard_stem(shard)}.parquet"

    def write_shard(self, part: str, shard: int, table: pa.Table) -> None:
        path = self.shard_path(part, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(path, table, **SHARD_WRITE_OPTIONS)

    def done_shards(self, part: str) -> set[int]:
        """Shards present and whole as far as a cheap look tells (Parquet signature at both ends):
        a cut or garbage shard counts as missing, so that a re-run of encode redoes it."""
        folder = self.root / part
        if not folder.is_dir():
            return set()
        return {int(p.stem) for p in folder.glob("*.parquet") if p.stem.isdigit() and file_problem(p, {}) is None}

    def reading_shard(self, path: Path):
        return reading(path, "embedding shard", "delete it and re-run the same `shnet encode` command to redo it")

    def complete_part(self, part: str) -> dict:
        """The part's record entry, refusing when some of its shards are missing (an interrupted encode)."""
        entry = self.part(part)
        missing = sorted(set(range(entry["shards"])) - self.done_shards(part))
        if missing:
            raise ShnetError(
                f"{self.root}: {len(missing)} of {entry['shards']} {part} shard(s) are missing (an interrupted encode); "
                "re-run the same `shnet encode` command to finish it"
            )
        return entry

    def chunks(self, part: str, rows: int = 65536) -> Iterator[Chunk]:
        """The part's embeddings in order, at most ``rows`` at a time (never the whole matrix)."""
        entry, start = self.complete_part(part), 0
        for shard in range(entry["shards"]):
            path = self.shard_path(part, shard)
            with self.reading_shard(path):
                batches = pq.ParquetFile(path).iter_batches(batch_size=rows, columns=["embedding"])
            while True:
                with self.reading_shard(path):
                    batch = next(batches, None)
                    matrix = None if batch is None else embedding_matrix(batch.column(0))
                if matrix is None:
                    break
                yield Chunk(start, matrix)
                start += len(matrix)

    def rows(self, part: str, global_rows: np.ndarray, columns: list[str]) -> list[dict]:
        """The given rows' ``columns`` (not their embeddings), in the order asked."""
        entry = self.complete_part(part)
        size = entry["shard_size"]
        out: dict[int, dict] = {}
        for shard in np.unique(np.asarray(global_rows) // size):
            path = self.shard_path(part, int(shard))
            with self.reading_shard(path):
                table = pq.read_table(path, columns=columns).to_pylist()
            for row in global_rows:
                if row // size == shard:
                    out[int(row)] = table[int(row) % size]
        return [out[int(r)] for r in global_rows]

    def find(self, part: str, column: str, value: str) -> tuple[int, np.ndarray]:
        """The global row and embedding of the first row whose ``column`` equals ``value``."""
        entry = self.complete_part(part)
        for shard in range(entry["shards"]):
            path = self.shard_path(part, shard)
            with self.reading_shard(path):
                hits = np.flatnonzero(pq.read_table(path, columns=[column]).column(column).to_numpy(zero_copy_only=False) == value)
                if len(hits):
                    row = int(hits[0])
                    embeddings = pq.read_table(path, columns=["embedding"]).column("embedding")
                    return shard * entry["shard_size"] + row, embedding_matrix(embeddings.slice(row, 1))[0]
        raise ShnetError(f"no {column} {value!r} among the {entry['rows']} encoded {part} of {self.root}")

    def remove_stale_temporaries(self) -> None:
        """Delete ``*.tmp-*`` leftovers of an interrupted encode; only call while holding the lock."""
        for path in self.root.rglob("*.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time (released by the OS if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ShnetError(f"{self.root} is being written by another `shnet encode`; wait for it to finish") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}\n")
            fh.flush()
            yield
