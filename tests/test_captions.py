"""The captions module on the cache floor: torch-free, and the captions a cache carries read like any
caption file (the caption-file readers themselves are tested in test_trainer_data.py)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from shnet.cache import create_cache
from shnet.cache.captions import captions_source, read_captions, select_split, write_cache_captions
from shnet.errors import ShnetError


def test_captions_import_no_torch():
    probe = "import sys, shnet.cache.captions; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'matplotlib'}))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def _cache(root, ids):
    images = pd.DataFrame({"image_id": ids, "path": "", "bytes": 0})
    return create_cache(root, images, shard_size=10, roots=[])


def test_a_cache_carries_its_captions_in_order(tmp_path):
    cache = _cache(tmp_path / "c", ["b", "a"])
    frame = pd.DataFrame({"image_id": ["b", "b", "a"], "caption": ["b one", "b two", "a one"], "split": "test"})
    write_cache_captions(cache, frame)
    source = captions_source(None, [cache.root])
    test = select_split(read_captions(source), "test")
    assert test.images == ["b", "a"] and test.captions == ["b one", "b two", "a one"]
    assert captions_source("given.csv", [cache.root]) == "given.csv"


def test_captions_of_images_a_cache_lacks_are_refused(tmp_path):
    cache = _cache(tmp_path / "c", ["a"])
    with pytest.raises(ShnetError, match="does not hold"):
        write_cache_captions(cache, pd.DataFrame({"image_id": ["ghost"], "caption": ["x"], "split": "test"}))


def test_no_caption_source_is_named(tmp_path):
    cache = _cache(tmp_path / "c", ["a"])
    with pytest.raises(ShnetError, match="--captions FILE"):
        captions_source(None, [cache.root])
    other = _cache(tmp_path / "d", ["a"])
    for held in (cache, other):
        write_cache_captions(held, pd.DataFrame({"image_id": ["a"], "caption": ["x"], "split": "test"}))
    with pytest.raises(ShnetError, match="several caches hold captions"):
        captions_source(None, [cache.root, other.root])
