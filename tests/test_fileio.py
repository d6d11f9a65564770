"""The writing half of shnet.fileio: one temporary-name scheme, atomic replace, the sweep, the lock."""

from __future__ import annotations

import json
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shnet.errors import CacheError, ShnetError
from shnet.fileio import (
    DirectoryLock,
    atomic_copy,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    remove_stale_temporaries,
    temporary_name,
)


def test_temporary_names_are_beside_the_target_and_unique_per_writer(tmp_path):
    target = tmp_path / "model.pth"
    names = {temporary_name(target) for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert name.parent == tmp_path and re.fullmatch(r"model\.pth\.tmp-[0-9a-f]{16}", name.name)


def test_atomic_path_publishes_on_success_only(tmp_path):
    target = tmp_path / "shard.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and target.read_bytes() == b"old"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin"]


def test_atomic_open_writes_bytes_and_text_and_refuses_other_modes(tmp_path):
    with atomic_open(tmp_path / "a.npy") as fh:
        fh.write(b"\x93NUMPY")
    with atomic_open(tmp_path / "b.txt", "w", encoding="utf-8") as fh:
        fh.write("é\n")
    assert (tmp_path / "a.npy").read_bytes() == b"\x93NUMPY"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "é\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "c.txt", "a"):
            pass
    assert not (tmp_path / "c.txt").exists()


def test_bytes_text_json_parquet_and_copy(tmp_path):
    atomic_write_bytes(tmp_path / "raw", b"\x00\x01")
    atomic_write_text(tmp_path / "page.html", "<p>ü</p>")
    atomic_write_json(tmp_path / "record.json", {"b": 1, "a": [1, 2]})
    atomic_write_parquet(tmp_path / "frame.parquet", pd.DataFrame({"x": [1, 2]}, index=[5, 6]))
    atomic_write_parquet(tmp_path / "arrow.parquet", pa.table({"v": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))}), compression="zstd")
    atomic_copy(tmp_path / "record.json", tmp_path / "copy.json")
    assert (tmp_path / "raw").read_bytes() == b"\x00\x01"
    assert (tmp_path / "page.html").read_text(encoding="utf-8") == "<p>ü</p>"
    text = (tmp_path / "record.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.index('"a"') < text.index('"b"') and text.endswith("}\n")
    assert pd.read_parquet(tmp_path / "frame.parquet").to_dict("list") == {"x": [1, 2]}
    assert pq.read_table(tmp_path / "arrow.parquet").schema.field("v").type == pa.list_(pa.float32(), 2)
    assert (tmp_path / "copy.json").read_bytes() == (tmp_path / "record.json").read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_sweep_removes_only_leftover_temporaries(tmp_path):
    (tmp_path / "stage").mkdir()
    leftovers = [temporary_name(tmp_path / "stage" / "00000.h5"), temporary_name(tmp_path / "cache.json")]
    for path in leftovers:
        path.write_bytes(b"partial")
    kept = [tmp_path / "stage" / "00000.h5", tmp_path / "notes.tmp", tmp_path / "tmp-file"]
    for path in kept:
        path.write_bytes(b"keep")
    assert remove_stale_temporaries(tmp_path) == 2
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)


def test_directory_lock_takes_one_writer_and_names_the_holder(tmp_path):
    with DirectoryLock(tmp_path / "store", "shnet encode"):
        assert "pid" in (tmp_path / "store" / ".lock").read_text()
        with pytest.raises(CacheError, match=r"being written by another `shnet extract` \(pid \d+ on .*\); wait for it to finish"):
            DirectoryLock(tmp_path / "store", "shnet extract", CacheError).acquire()
        with pytest.raises(ShnetError, match="another `shnet encode`"):
            with DirectoryLock(tmp_path / "store", "shnet encode"):
                pass
    with DirectoryLock(tmp_path / "store", "shnet encode"):
        pass


def test_cache_keeps_its_lock_and_writers_on_the_one_layer():
    from shnet.cache import store

    assert issubclass(store.CacheLock, DirectoryLock)
    assert store.atomic_write_json is atomic_write_json and store.atomic_write_parquet is atomic_write_parquet
