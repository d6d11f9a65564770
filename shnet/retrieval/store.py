"""The embedding store on disk: per shard a Parquet table and the raw embedding matrix, a done
record vouching for both, and the store's record of where they came from.

Layout of one store directory (``shnet encode RUN --cache CACHE -o EMB``)::

    embeddings.json            format, the run (checkpoint path, sha256, epoch), caches, dtype,
                               dimension, shard plan and row counts of each part
    images/00000.parquet       image_id, path, embedding (fixed_size_list<float32|float16>[D])
    matrices/images/00000.npy  the same embeddings as a raw little-endian [rows, D] matrix of the
                               store's dtype (memory-mapped by search: no Parquet list decoding)
    screens/images/00000.npy   the same rows rounded to bfloat16 (uint16 bits): exact search's full
                               screen
    projections/images/00000.npy  the rows on the part's basis, bfloat16 bits [rows, r + 1], the last
                               column an upper bound on what the projection misses: exact search's
                               projected screen (see :mod:`shnet.retrieval.projection`)
    bases/images.npy           the part's basis, float32 [r, D]: learnt from the first shard written,
                               then kept (a resumed encode and every later shard use it)
    done/images/00000.done     written last: rows, dimension, largest row norm, the projection's
                               bounds, and the bytes and sha256 of the four files above and the basis
    captions/00000.parquet     caption_id, image, image_id, split, caption, embedding (and its
                               matrices/, screens/ and done/ files)
    index/images.faiss         the approximate index (``--index``) and index/index.json, its record
    .lock                      held by the one encode that may write the store

A shard's files are written under temporary names and renamed into place, its done record last; a
shard counts as done only when its done record is readable and both files match it (sizes, Parquet
signature, each ``.npy`` header's dtype and shape, the basis's sha256), so a cut or rewritten file is
redone by the next encode and named by search. Read a part as one frame with ``pd.read_parquet("EMB/images")`` (the
part's folder holds its Parquet tables only).
Stores of format 1 (Parquet only, before the ``.npy`` matrices) are refused with the command that
re-encodes them. Shards of format 2 written before the projections (their done records name none)
are searched with the full screen only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..cache.store import file_problem, shard_stem, vouch
from ..errors import ShnetError
from ..fileio import DirectoryLock, atomic_open, atomic_write_json, atomic_write_parquet, content_sha256, read_json, reading, remove_stale_temporaries
from .bfloat16 import bfloat16_bits
from .projection import Projected, basis_of, project, rank_for
from .topk import Chunk, Matrix

FORMAT = "shnet-embeddings"
FORMAT_VERSION = 2
RECORD = "embeddings.json"
PARTS = ("images", "captions")
DTYPES = ("float32", "float16")
_ARROW_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
# Embeddings do not compress and dictionary encoding only slows them: plain pages read 2-3x faster;
# row groups of 32768 rows let a reader stream a shard without holding all of it.
SHARD_WRITE_OPTIONS = {"compression": "none", "use_dictionary": False, "row_group_size": 32768}
REDO = "re-run the same `shnet encode` command to redo it"
_FOLDERS = {"table": "", "matrix": "matrices", "screen": "screens", "projection": "projections", "done": "done"}
_SUFFIXES = {"table": ".parquet", "matrix": ".npy", "screen": ".npy", "projection": ".npy", "done": ".done"}


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


def npy_problem(path: Path, vouched: dict) -> str | None:
    """What is wrong with a shard's ``.npy`` against its done record (size, then the header: a
    little-endian C-order matrix of the recorded dtype and shape that fills the file); None if nothing."""
    problem = file_problem(path, vouched)
    if problem is not None:
        return problem
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return f"is a .npy file of version {version}, not one shnet writes"
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        return f"is not a .npy file ({' '.join(str(exc).split())[:120]})"
    expected = np.dtype(vouched["dtype"]).newbyteorder("<")
    if fortran or dtype != expected or tuple(shape) != (vouched["rows"], vouched["dimension"]):
        return f"holds a {'Fortran-order ' if fortran else ''}{dtype.str} {tuple(shape)} matrix, its done record vouches for {expected.str} ({vouched['rows']}, {vouched['dimension']})"
    if path.stat().st_size != offset + expected.itemsize * vouched["rows"] * vouched["dimension"]:
        return "is cut short or padded (its size does not match its header)"
    return None


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
        if record.get("format_version", 0) < FORMAT_VERSION:
            raise ShnetError(
                f"{self.root} was written by an older shnet (format {record.get('format_version')}: Parquet shards without the .npy "
                f"matrices search reads); re-encode it: `shnet encode RUN --cache CACHE [--captions FILE] -o NEW_FOLDER`"
            )
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
    def shard_path(self, part: str, shard: int, kind: str = "table") -> Path:
        """A shard's ``table`` (Parquet), ``matrix``, ``screen`` or ``projection`` (``.npy``) or ``done`` record."""
        return self.root / _FOLDERS[kind] / part / f"{shard_stem(shard)}{_SUFFIXES[kind]}"

    def basis_path(self, part: str) -> Path:
        return self.root / "bases" / f"{part}.npy"

    def _basis_for(self, part: str, embeddings: np.ndarray) -> np.ndarray:
        """The part's basis: the one on disk when whole, else learnt from ``embeddings`` and written."""
        path = self.basis_path(part)
        shape = (rank_for(embeddings.shape[1]), embeddings.shape[1])
        if path.is_file() and npy_problem(path, {"rows": shape[0], "dimension": shape[1], "dtype": "float32"}) is None:
            return np.load(path, allow_pickle=False)
        basis = basis_of(embeddings)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as fh:
            np.lib.format.write_array(fh, basis, allow_pickle=False)
        return basis

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def write_shard(self, part: str, shard: int, table: pa.Table, embeddings: np.ndarray, dtype: str) -> None:
        """Commit one shard: its matrix (``embeddings`` as ``dtype``, little-endian) and its table
        (the same embeddings as its ``embedding`` column), then the done record vouching for both."""
        matrix = np.ascontiguousarray(embeddings, dtype=np.dtype(dtype).newbyteorder("<"))
        if matrix.ndim != 2 or len(matrix) != table.num_rows:
            raise ValueError(f"{matrix.shape} embeddings for a table of {table.num_rows} rows")
        done, npy, screen, projection, parquet = (self.shard_path(part, shard, kind) for kind in ("done", "matrix", "screen", "projection", "table"))
        for path in (done, npy, screen, projection, parquet):
            path.parent.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        projected = project(matrix, self._basis_for(part, matrix))
        for path, values in ((npy, matrix), (screen, bfloat16_bits(matrix)), (projection, projected.columns)):
            with atomic_open(path) as fh:
                np.lib.format.write_array(fh, values, allow_pickle=False)
        atomic_write_parquet(parquet, table.append_column("embedding", embedding_column(matrix, dtype)), **SHARD_WRITE_OPTIONS)
        norms = np.linalg.norm(matrix.astype(np.float32), axis=1)
        atomic_write_json(
            done,
            {
                "rows": int(len(matrix)),
                "dimension": int(matrix.shape[1]),
                "dtype": dtype,
                "max_norm": float(norms.max()) if len(norms) else 0.0,
                "projection": {"rank": projected.columns.shape[1] - 1, "sigma": projected.sigma, "max_norm": projected.max_norm},
                "files": {self._key(path): vouch(path) for path in (npy, screen, projection, parquet, self.basis_path(part))},
            },
        )

    def shard_problem(self, part: str, shard: int) -> str | None:
        """Why ``shard`` of ``part`` is not done (a file named), or None when its done record vouches
        for files that look whole (cheap: sizes, signatures, the matrix header; no hashing)."""
        done = self.shard_path(part, shard, "done")
        if not done.exists():
            return f"shard {shard_stem(shard)} of {self.root / part} was never finished (no {done})"
        try:
            record = read_json(done, "a shard's done record", REDO)
        except ShnetError as exc:
            return str(exc)
        npy, screen, parquet = (self.shard_path(part, shard, kind) for kind in ("matrix", "screen", "table"))
        files = record.get("files", {}) if isinstance(record, dict) else {}
        if any(self._key(path) not in files for path in (npy, screen, parquet)):
            return f"{done} does not vouch for the shard's three files; {REDO}"
        shape = {k: record[k] for k in ("rows", "dimension")}
        checks = [(npy, record["dtype"], shape), (screen, "uint16", shape)]
        if "projection" in record:  # shards written before the projections have none
            projection, basis = self.shard_path(part, shard, "projection"), self.basis_path(part)
            if any(self._key(path) not in files for path in (projection, basis)):
                return f"{done} does not vouch for the shard's projection and the basis; {REDO}"
            rank = record["projection"]["rank"]
            checks += [(projection, "uint16", {"rows": record["rows"], "dimension": rank + 1}), (basis, "float32", {"rows": rank, "dimension": record["dimension"]})]
        for path, dtype, dims in checks:
            problem = npy_problem(path, {**files[self._key(path)], **dims, "dtype": dtype})
            if problem is not None:
                return f"{path} {problem}; {REDO}"
        if "projection" in record and content_sha256(basis) != files[self._key(basis)]["sha256"]:
            return f"{basis} is not the basis {done} was projected on (sha256 differs: rewritten since); {REDO}"
        problem = file_problem(parquet, files[self._key(parquet)])
        return None if problem is None else f"{parquet} {problem}; {REDO}"

    def done_shards(self, part: str) -> set[int]:
        """Shards whose done record vouches for whole-looking files; a re-run of encode redoes the rest."""
        folder = self.shard_path(part, 0, "done").parent
        if not folder.is_dir():
            return set()
        return {int(p.stem) for p in folder.glob("*.done") if p.stem.isdigit() and self.shard_problem(part, int(p.stem)) is None}

    def complete_part(self, part: str) -> dict:
        """The part's record entry, refusing (naming the first bad shard) when a shard is missing or damaged."""
        entry = self.part(part)
        problems = {s: self.shard_problem(part, s) for s in range(entry["shards"])}
        bad = {s: p for s, p in problems.items() if p is not None}
        if bad:
            first = next(iter(bad.values()))
            raise ShnetError(
                f"{self.root}: {len(bad)} of {entry['shards']} {part} shard(s) are missing or damaged (an interrupted encode, or "
                f"a file changed since), e.g. {first}; re-run the same `shnet encode` command to finish it"
            )
        return entry

    def matrix(self, part: str) -> Matrix:
        """The part's embeddings as one :class:`Matrix` over its shards' memory-mapped matrices and
        screens (nothing read until used; never unpickled)."""
        entry = self.complete_part(part)
        blocks, screens, projected, basis, max_norm = [], [], [], None, 0.0
        for shard in range(entry["shards"]):
            for path, out in ((self.shard_path(part, shard, "matrix"), blocks), (self.shard_path(part, shard, "screen"), screens)):
                out.append(self._load(path))
            done = read_json(self.shard_path(part, shard, "done"), "a shard's done record", REDO)
            max_norm = max(max_norm, float(done["max_norm"]))
            bounds = done.get("projection")
            if bounds is not None and basis is None:
                basis = np.array(self._load(self.basis_path(part)))
            columns = self._load(self.shard_path(part, shard, "projection")) if bounds is not None else None
            projected.append(Projected(columns, bounds["sigma"], bounds["max_norm"]) if bounds is not None else None)
        return Matrix(blocks, max_norm, screens, projected, basis)

    def _load(self, path: Path) -> np.ndarray:
        with self.reading_shard(path):
            return np.load(path, mmap_mode="r", allow_pickle=False)

    def chunks(self, part: str, rows: int = 65536) -> Iterator[Chunk]:
        """The part's embeddings in order, at most ``rows`` at a time (memory-mapped views)."""
        return self.matrix(part).chunks(rows)

    def reading_shard(self, path: Path):
        return reading(path, "embedding shard", f"delete it and {REDO}")

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
                row = shard * entry["shard_size"] + int(hits[0])
                return row, self.matrix(part).take(np.array([row]))[0]
        raise ShnetError(f"no {column} {value!r} among the {entry['rows']} encoded {part} of {self.root}")

    def remove_stale_temporaries(self) -> None:
        """Delete ``*.tmp-*`` leftovers of an interrupted encode; only call while holding the lock."""
        remove_stale_temporaries(self.root)

    def lock(self) -> DirectoryLock:
        """One writer at a time (released by the OS if the process dies)."""
        return DirectoryLock(self.root, "shnet encode")
