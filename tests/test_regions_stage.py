"""Stage ``regions`` through ``shnet extract``: real photos and odd files, real shards (tasks in-process). A random-initialised ResNet-50 detector at a small input size keeps it fast on a CPU."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from shnet.cache.store import config_hash
from shnet.cli import main
from shnet.pipeline.models.butd.conventions import CAFFE, D2
from shnet.pipeline.models.butd.detector import BUTDDetector

K = 4
FAST = [
    "--stages", "regions", "--profile", "butd-36",
    "--set", "regions.weights=random", "--set", "regions.depth=50",
    "--set", "regions.min_size=96", "--set", "regions.max_size=128",
    "--set", f"regions.post_nms_topk={K + 1}", "--set", f"regions.num_boxes={K}",
]  # fmt: skip


@pytest.fixture(scope="module")
def regions_cache(mixed_dir, tmp_path_factory, extract):
    cache = tmp_path_factory.mktemp("regions") / "cache"
    result = extract(mixed_dir, "-o", cache, *FAST, "--shard-size", 5, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    return cache


def read_regions(cache) -> dict[str, np.ndarray]:
    arrays: dict[str, list] = {}
    for shard in sorted((cache / "regions").glob("*.h5")):
        with h5py.File(shard) as fh:
            for name in fh:
                arrays.setdefault(name, []).append(fh[name][:])
    return {name: np.concatenate(parts) for name, parts in arrays.items()}


def test_every_photo_gets_exactly_k_boxes_inside_the_image(regions_cache):
    table = pd.read_parquet(regions_cache / "regions" / "table").sort_values(["shard", "row"])
    arrays = read_regions(regions_cache)
    ok = (table["status"] == "ok").to_numpy()
    assert ok.sum() == 7 and set(table.loc[~ok, "image_id"]) == {"bad/empty", "bad/not-an-image", "bad/truncated"}
    assert arrays["features"].shape[1:] == (K, 2048) and arrays["features"].dtype == np.float16
    assert arrays["boxes"].shape[1:] == (K, 4) and arrays["num_boxes"].dtype == np.int32
    assert (arrays["num_boxes"][ok] == K).all() and (table.loc[ok, "num_boxes"] == K).all()
    assert np.isfinite(arrays["features"][ok].astype(np.float32)).all()
    images = pd.read_parquet(regions_cache / "images.parquet").set_index("image_id")
    for index in np.flatnonzero(ok):
        image_id = table["image_id"].iloc[index]
        height, width = arrays["image_hw"][index]
        assert (height, width) == (images.loc[image_id, "height"], images.loc[image_id, "width"])
        boxes = arrays["boxes"][index]
        assert (boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (arrays["object_class"][index] < 1600).all() and (arrays["attr_class"][index] < 400).all()
    for name in ("features", "boxes", "object_score", "num_boxes", "image_hw"):
        assert not arrays[name][~ok].any(), name


def test_shards_record_model_and_selection(regions_cache):
    with h5py.File(regions_cache / "regions" / "00000.h5") as fh:
        attrs = dict(fh.attrs)
    assert "random-init" in attrs["model"] and attrs["weights_sha256"] == "random-init"
    assert attrs["selection"] == "caffe" and attrs["num_boxes"] == K and attrs["conf_threshold"] == 0.2
    assert attrs["nms_iou"] == 0.3 and attrs["convention"] == "caffe"
    objects, attributes = json.loads(attrs["object_names"]), json.loads(attrs["attribute_names"])
    assert (len(objects), len(attributes)) == (1600, 400) and objects[:2] == ["yolk", "goal"]


def test_rerun_does_nothing_and_verify_is_clean(regions_cache, mixed_dir, extract):
    result = extract(mixed_dir, "-o", regions_cache, *FAST)
    assert result.exit_code == 0 and "nothing to do" in result.output
    verified = CliRunner().invoke(main, ["verify", str(regions_cache)])
    assert verified.exit_code == 0, verified.output


def test_given_boxes_are_pooled_exactly(photo_dir, tmp_path, extract):
    given = {"animals/chelsea": [[10, 12, 80, 90], [0, 0, 159, 100], [40.5, 20.25, 41.5, 30]], "things/coffee": [[5, 5, 60, 60]]}
    (tmp_path / "boxes.json").write_text(json.dumps(given))
    cache = tmp_path / "cache"
    result = extract(photo_dir, "-o", cache, *FAST, "--set", f"regions.boxes={tmp_path / 'boxes.json'}")
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(cache / "regions" / "table").sort_values(["shard", "row"]).reset_index(drop=True)
    arrays = read_regions(cache)
    assert arrays["boxes"].shape[1] == 3  # K = the most boxes the file gives one image
    for image_id, boxes in given.items():
        index = table.index[table["image_id"] == image_id][0]
        assert arrays["num_boxes"][index] == len(boxes)
        np.testing.assert_array_equal(arrays["boxes"][index, : len(boxes)], np.asarray(boxes, np.float32))
        assert not arrays["boxes"][index, len(boxes) :].any()
    missing = table[~table["image_id"].isin(list(given))]
    assert (missing["status"] == "error").all() and missing["error"].str.contains("gives no boxes for image").all()


def test_a_mismatched_weights_file_is_refused_before_any_work(photo_dir, tmp_path, extract):
    torch.save({"proposal_generator.rpn_head.objectness_logits.weight": torch.zeros(12, 512, 1, 1)}, tmp_path / "partial.pth")
    result = extract(photo_dir, "-o", tmp_path / "cache", *FAST, "--set", f"regions.weights={tmp_path / 'partial.pth'}", ok=False)
    assert result.exit_code == 1
    assert "partial.pth does not match the bottom-up-attention detector" in result.output
    assert "backbone.stem.conv1.weight" in result.output and "allow_missing_keys" in result.output
    assert not (tmp_path / "cache" / "regions").exists()


def test_option_errors_name_the_option(photo_dir, tmp_path, extract):
    cases = {
        "regions.selection=best": "regions.selection must be one of caffe, d2",
        "regions.min_boxes=10": "either num_boxes",
        "regions.depth=34": "regions.depth must be 101",
        "regions.conf_threshold=high": "regions.conf_threshold must be a number",
    }
    for assignment, message in cases.items():
        result = extract(photo_dir, "-o", tmp_path / "cache", *FAST, "--set", assignment, ok=False)
        assert result.exit_code == 1 and message in result.output, result.output


def checkpoint_with_bn_statistics(path, convention):
    """An R-50 detector whose frozen BN is far from the identity, so zero padding would not stay zero."""
    torch.manual_seed(11)
    model = BUTDDetector(50, convention)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var", "norm.weight", "norm.bias")):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("convention", [CAFFE, D2], ids=["caffe", "d2"])
def test_batch_size_does_not_change_regions(photo_dir, tmp_path, convention, extract):
    """Batches of 5 mix the photos' sizes; each image gets bit for bit what it gets in a batch of 1."""
    weights = checkpoint_with_bn_statistics(tmp_path / "bn.pth", convention)
    caches = {}
    for batch_size in (1, 5):
        caches[batch_size] = tmp_path / f"batch{batch_size}"
        result = extract(photo_dir, "-o", caches[batch_size], *FAST, "--set", f"regions.weights={weights}", "--batch-size", batch_size)
        assert result.exit_code == 0, result.output
    alone, mixed = read_regions(caches[1]), read_regions(caches[5])
    ratios = {round(float(h) / float(w), 2) for h, w in mixed["image_hw"][:5]}
    assert len(ratios) >= 3 and (mixed["num_boxes"] == K).all()
    for name, values in alone.items():
        np.testing.assert_array_equal(mixed[name], values, err_msg=name)


def test_a_cache_of_earlier_numerics_is_refused(regions_cache, mixed_dir, tmp_path, extract):
    """A cache extracted before the per-checkpoint resize and unpadded batches records no ``numerics``:
    new shards must not join it."""
    old = tmp_path / "old"
    shutil.copytree(regions_cache, old)
    record = json.loads((old / "cache.json").read_text())
    entry = record["stages"]["regions"]
    del entry["config"]["numerics"]
    entry["config_hash"] = config_hash({k: v for k, v in entry["config"].items() if k not in ("weights", "boxes")})
    (old / "cache.json").write_text(json.dumps(record))
    result = extract(mixed_dir, "-o", old, *FAST, ok=False)
    assert result.exit_code == 1
    assert "regions.numerics: cache has None" in result.output and "different config" in result.output


def test_given_boxes_are_clipped_to_the_image_and_boxes_outside_it_refused(photo_dir, tmp_path, extract):
    from PIL import Image

    _, height = Image.open(photo_dir / "things" / "coffee.jpg").size
    given = {
        "things/coffee": [[-5, 10, 40, 1e30], [5, 5, 60, 60]],  # the first reaches past two edges
        "animals/chelsea": [[10, 10, 20, 20], [5000, 10, 6000, 20]],  # the second lies wholly to the right
    }
    (tmp_path / "boxes.json").write_text(json.dumps(given))
    cache = tmp_path / "cache"
    result = extract(photo_dir, "-o", cache, *FAST, "--set", f"regions.boxes={tmp_path / 'boxes.json'}")
    assert result.exit_code == 0, result.output
    assert "1 given box(es) reached past their image and were clipped to it" in result.output
    table = pd.read_parquet(cache / "regions" / "table").sort_values(["shard", "row"]).reset_index(drop=True)
    arrays = read_regions(cache)
    coffee = table.index[table["image_id"] == "things/coffee"][0]
    np.testing.assert_array_equal(arrays["boxes"][coffee, :2], np.asarray([[0, 10, 40, height], [5, 5, 60, 60]], np.float32))
    assert table.loc[coffee, "clipped_boxes"] == 1 and table.loc[coffee, "status"] == "ok"
    assert np.abs(arrays["features"][coffee, :2].astype(np.float32)).sum(axis=1).min() > 0
    chelsea = table[table["image_id"] == "animals/chelsea"].iloc[0]
    assert chelsea["status"] == "error" and "1 of the 2 boxes of image 'animals/chelsea' lie wholly outside" in chelsea["error"]
