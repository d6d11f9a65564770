"""Caption readers, image matching and feature loading from synthetic caches."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from shnet.errors import ShnetError
from shnet.cache import Cache, write_stage
from shnet.cache.store import vouch
from shnet.cache.captions import match_images, read_captions, select_split
from shnet.cache.features import FeatureIndex
from shnet.trainer.data import (
    TrainPairs,
    caption_loader,
    collate_images,
    drop_regions,
    image_loader,
    match_split,
    train_loader,
)
from shnet.trainer.synthetic import write_concept_cache
from shnet.trainer.text_encoders import VocabularyTokenizer


def karpathy_file(tmp_path):
    def sentences(*texts):
        return [{"raw": t, "tokens": t.split()} for t in texts]

    data = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "COCO_1.jpg", "split": "test", "sentences": sentences(*[f"one {k}" for k in range(7)])},
            {"filepath": "train2014", "filename": "COCO_2.jpg", "split": "train", "sentences": sentences("two a", "two b")},
            {"filepath": "val2014", "filename": "COCO_3.jpg", "split": "restval", "sentences": sentences("three a")},
            {"filepath": "val2014", "filename": "COCO_4.jpg", "split": "val", "sentences": sentences("four a")},
        ],
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path


def test_karpathy_reader_names_splits_and_first_five(tmp_path):
    table = read_captions(karpathy_file(tmp_path))
    assert table.dataset == "coco" and table.splits == ["restval", "test", "train", "val"]
    test = select_split(table, "test")
    assert test.images == ["val2014/COCO_1.jpg"]
    assert test.captions == [f"one {k}" for k in range(5)]  # the first 5 of 7, as the precomputed files
    train = select_split(table, "train")  # train takes restval too
    assert train.images == ["train2014/COCO_2.jpg", "val2014/COCO_3.jpg"]
    assert train.captions == ["two a", "two b", "three a"] and list(train.caption_image) == [0, 0, 1]
    with pytest.raises(ShnetError, match="no captions in split 'dev'.*restval, test, train, val"):
        select_split(table, "dev")
    with pytest.raises(ShnetError, match="exactly 5 captions per image.*COCO_2.jpg \\(2\\)"):
        train.require_captions_per_image(5)
    test.require_captions_per_image(5)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_readers_group_captions_by_image(tmp_path, suffix):
    frame = pd.DataFrame(
        {
            "image_id": ["b", "a", "b", "a", "c"],
            "caption": ["b1", "a1", " b2 ", "a2", "c1"],
            "split": ["test", "test", "test", "test", "train"],
        }
    )
    path = tmp_path / f"captions{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    test = select_split(read_captions(path), "test")
    assert test.images == ["b", "a"]
    assert test.captions == ["b1", "b2", "a1", "a2"] and list(test.caption_image) == [0, 0, 1, 1]
    assert test.dataset is None


def test_table_reader_errors(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"image": ["a"], "caption": ["x"]}).to_csv(path, index=False)
    with pytest.raises(ShnetError, match="missing column.*image_id.*split"):
        read_captions(path)
    with pytest.raises(ShnetError, match="does not exist"):
        read_captions(tmp_path / "nope.json")
    (tmp_path / "captions.txt").write_text("x")
    with pytest.raises(ShnetError, match="Karpathy .json or a .csv"):
        read_captions(tmp_path / "captions.txt")


def test_image_matching_rules_and_report():
    cache_ids = ["val2014/COCO_1", "COCO_2", "a/dup", "b/dup", "plain.name"]
    match = match_images(["val2014/COCO_1.jpg", "train2014/COCO_2.jpg", "x/dup.png", "plain.name", "gone.jpg"], cache_ids)
    assert match.cache_ids == {"val2014/COCO_1.jpg": "val2014/COCO_1", "train2014/COCO_2.jpg": "COCO_2", "plain.name": "plain.name"}
    assert match.ambiguous == {"x/dup.png": ["a/dup", "b/dup"]}
    assert match.not_in_cache == ["gone.jpg"]
    report = match.report("test", 5)
    assert "2 of 5 images of split 'test'" in report and "gone.jpg" in report and "shnet extract" in report


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    captions = write_concept_cache(root, {"train": 24, "test": 6}, feature_dim=16, num_boxes=6, grid_size=3, shard_size=7)
    path = root / "captions.csv"
    captions.to_csv(path, index=False)
    return root, path


def test_cache_has_several_shards_and_index_shapes(cache):
    root, _ = cache
    assert Cache(root).num_shards == 5
    index = FeatureIndex([root], "region")
    assert index.feature_dim == 16 and index.num_classes == 133 and len(index.image_ids) == 30


def _rewrite_table(cache: Cache, stage: str, image_id: str, **values) -> None:
    """Shard 0's table of ``stage`` with ``values`` for one image, as an extract would have written
    it (its done marker vouching for the new file)."""
    path = cache.table_path(stage, 0)
    table = pd.read_parquet(path)
    table.loc[table["image_id"] == image_id, list(values)] = list(values.values())
    table.to_parquet(path)
    marker = cache.done_marker(stage, 0)
    marker["files"]["table/00000.parquet"] = vouch(path)
    cache.done_path(stage, 0).write_text(json.dumps(marker))


def test_failed_and_missing_images_are_reported(cache, tmp_path):
    root, captions_path = cache
    copy = tmp_path / "cache"
    import shutil

    shutil.copytree(root, copy)
    _rewrite_table(Cache(copy), "layout", "img00002", status="error", error="panoptic failed")
    _rewrite_table(Cache(copy), "regions", "img00003", num_boxes=0)
    frame = pd.read_csv(captions_path)
    frame = pd.concat([frame, pd.DataFrame({"image_id": ["ghost"] * 5, "caption": ["x"] * 5, "split": ["train"] * 5})])
    frame.to_csv(tmp_path / "captions.csv", index=False)
    train = select_split(read_captions(tmp_path / "captions.csv"), "train")
    index = FeatureIndex([copy], "region")
    warnings = []
    kept = match_split(train, index, "drop", warnings.append)
    assert kept.num_images == 22 and not {"img00002", "img00003", "ghost"} & set(kept.images)
    assert "3 of 25 images" in warnings[0] and "ghost" in warnings[0]
    assert "panoptic failed" in warnings[0] and "no region detected" in warnings[0]
    with pytest.raises(ShnetError, match="3 of 25 images"):
        match_split(train, index, "error", warnings.append)


def test_caches_join_on_image_id(cache, tmp_path):
    root, _ = cache
    single = FeatureIndex([root], "region")
    ids = single.image_ids
    regions_only, layout_only = tmp_path / "regions", tmp_path / "layout"
    reader = single.reader(ids)
    reader.load_in_memory()
    items = [reader.read(i) for i in range(len(ids))]
    counts = np.array([len(item["tokens"]) for item in items])
    padded = np.zeros((len(ids), 9, 16), np.float16)  # another padded box count than the first cache
    for i, item in enumerate(items):
        padded[i, : counts[i]] = item["tokens"]
    write_stage(regions_only, "regions", ids[::-1], {"features": padded[::-1], "num_boxes": counts[::-1]}, {"k": 9}, shard_size=4)
    write_stage(
        layout_only, "layout", ids, {n: np.stack([it[n] for it in items]) for n in ("seg_feat", "seg_map", "cat_onehot")}, {}, shard_size=11
    )
    joined = FeatureIndex([regions_only, layout_only], "region").reader(ids)
    for i, item in enumerate(items):
        got = joined.read(i)
        assert all(np.array_equal(got[name], item[name]) for name in item)


def batches(loader, epoch=None):
    if epoch is not None:
        loader.batch_sampler.set_epoch(epoch)
    return list(loader)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        flat_x = {**x.get("images", {}), **{k: v for k, v in x.items() if k != "images"}}
        flat_y = {**y.get("images", {}), **{k: v for k, v in y.items() if k != "images"}}
        assert flat_x.keys() == flat_y.keys()
        for key in flat_x:
            assert torch.equal(flat_x[key], flat_y[key]), key


@pytest.mark.parametrize("level", ["region", "grid"])
def test_workers_and_in_memory_give_identical_batches(cache, level):
    root, captions_path = cache
    index = FeatureIndex([root], level)
    train = match_split(select_split(read_captions(captions_path), "train"), index, "error", print)
    tokenizer = VocabularyTokenizer.build(train.captions)
    hdf5 = index.reader(train.images)
    hdf5.read(0)  # the main process holds open handles before the workers fork
    memory = index.reader(train.images)
    memory.load_in_memory()
    assert pickle.loads(pickle.dumps(hdf5))._files == {}  # an open handle is never pickled

    in_main = batches(train_loader(TrainPairs(hdf5, train, tokenizer, seed=3), 16, 0, seed=3), epoch=1)
    in_workers = batches(train_loader(TrainPairs(hdf5, train, tokenizer, seed=3), 16, 2, seed=3), epoch=1)
    from_memory = batches(train_loader(TrainPairs(memory, train, tokenizer, seed=3), 16, 2, seed=3), epoch=1)
    assert_batches_equal(in_main, in_workers)
    assert_batches_equal(in_main, from_memory)
    assert len(in_main) == 120 // 16
    other_epoch = batches(train_loader(TrainPairs(hdf5, train, tokenizer, seed=3), 16, 0, seed=3), epoch=2)
    assert not torch.equal(in_main[0]["index"], other_epoch[0]["index"])

    fresh = index.reader(train.images)
    eval_workers = list(image_loader(fresh, 10, 2))
    assert fresh._files == {}  # the workers opened their own files
    assert_batches_equal(eval_workers, list(image_loader(memory, 10, 0)))
    assert sum(len(b["index"]) for b in eval_workers) == train.num_images  # each image once
    assert sum(len(b["index"]) for b in caption_loader(train, tokenizer, 32)) == len(train.captions)


def test_grid_cells_are_the_valid_block_row_major(cache):
    root, _ = cache
    index = FeatureIndex([root], "grid")
    cache_obj = Cache(root)
    image = cache_obj.images().iloc[9]
    with cache_obj.open_arrays("grid", int(image["shard"])) as h5:
        grid, (h, w) = h5["grid"][int(image["row"])], h5["valid_hw"][int(image["row"])]
    cells = index.reader([image["image_id"]]).read(0)["tokens"]
    assert cells.shape == (h * w, 16)
    assert np.array_equal(cells[w + 1], grid[1, 1])


def test_region_dropout_rate_and_collate_padding():
    rng = np.random.default_rng(0)
    tokens = np.arange(36 * 2, dtype=np.float16).reshape(36, 2)
    kept = [len(drop_regions(tokens, rng)) for _ in range(2000)]
    assert np.mean(kept) / 36 == pytest.approx(0.8, abs=0.01)
    assert all(len(drop_regions(tokens[:1], rng, rate=1.0)) == 1 for _ in range(5))  # never empty
    layout = {
        "seg_feat": np.zeros((133, 7, 7), np.float16),
        "seg_map": np.full((64, 64), 255, np.uint8),
        "cat_onehot": np.zeros(133, np.uint8),
    }
    batch = collate_images([{"tokens": tokens[:3], **layout}, {"tokens": tokens[:5], **layout}])
    assert batch["regions"].shape == (2, 5, 2) and batch["regions"].dtype == torch.float16  # as cached
    assert batch["lengths"].tolist() == [3, 5] and batch["regions"][0, 3:].abs().sum() == 0
    assert batch["seg_map"].shape == (2, 64, 64) and batch["seg_map"].dtype == torch.uint8 and batch["seg_map"].max() == 255
    assert batch["seg_feat"].shape == (2, 133, 7, 7) and batch["cat_onehot"].shape == (2, 133)


def test_in_memory_refuses_what_does_not_fit(cache, monkeypatch):
    import psutil

    root, _ = cache
    reader = FeatureIndex([root], "region").reader(["img00000", "img00001"])

    class Tiny:
        available = 10

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(ShnetError, match="drop --in-memory"):
        reader.load_in_memory()


def _set_layout_class_order(root, order):
    cache = Cache(root)
    cache.record["stages"]["layout"]["config"]["class_order"] = order
    cache.save_record()


def test_caches_of_different_class_orders_are_refused_and_models_checked(tmp_path):
    from shnet.trainer.model import ModelConfig

    a, b = tmp_path / "a", tmp_path / "b"
    write_concept_cache(a, {"train": 6}, feature_dim=16, num_boxes=4)
    write_concept_cache(b, {"val": 6}, feature_dim=16, num_boxes=4, seed=1)
    assert FeatureIndex([a, b], "region").class_order == "coco"  # layouts written before the option: COCO's order
    _set_layout_class_order(b, "upsnet")
    with pytest.raises(ShnetError, match=r"different class orders .*a: coco.*b: upsnet"):
        FeatureIndex([a, b], "region")
    _set_layout_class_order(a, "upsnet")
    index = FeatureIndex([a, b], "region")
    assert index.class_order == "upsnet"
    config = ModelConfig(region_dim=16, num_classes=133)
    for fits in (None, "unknown", "upsnet"):
        index.check_model_fits(config, fits, "run")
    with pytest.raises(ShnetError, match="class order 'coco'.*layout.class_order=coco"):
        index.check_model_fits(config, "coco", "run")
    with pytest.raises(ShnetError, match="takes 32-d region features"):
        index.check_model_fits(ModelConfig(region_dim=32, num_classes=133), None, "run")
    cache = Cache(b)
    cache.record["stages"]["layout"]["config"] = {"source": "npy-import"}
    cache.save_record()
    assert FeatureIndex([b], "region").class_order == "unknown"
    assert FeatureIndex([a, b], "region").class_order == "upsnet"  # an imported set's unknown order mixes with a known one
