"""``shnet import`` / ``shnet export`` of SCAN/3SHNet precomputed .npy sets: bit-exact round trips,
any subset of files, the published COCO loader's per-image region files (read here as that loader
reads them), training on an imported cache without a caption file, export of extracted caches,
streaming in bounded chunks, and one clear message per malformed set."""

from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import shnet.npy_sets.format as npy_format
from shnet.cache import Cache, ShardWriter, write_stage
from shnet.cache.inspect import verify_cache
from shnet.cache.rows import ShardRows
from shnet.cli import main

CLASSES = 133


def shnet(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result


def write_set(folder, sizes: dict, files=("ims", "segmentations", "seg_maps", "cat_onehots", "caps", "ids"), dim=2048, seed=0):
    """A small precomputed set as SCAN / 3SHNet ship it: float32 features [N,36,dim], float32
    [N,133,7,7] segmentation features, [N,64,64] class maps and [N,133] one-hots, 5 captions per image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        arrays = {
            "ims": rng.standard_normal((n, 36, dim)).astype(np.float32),
            "segmentations": rng.random((n, CLASSES, 7, 7)).astype(np.float32),
            "seg_maps": rng.integers(0, CLASSES, (n, 64, 64)).astype(np.float32),
            "cat_onehots": (rng.random((n, CLASSES)) > 0.9).astype(np.float32),
        }
        for name, values in arrays.items():
            if name in files:
                np.save(folder / f"{split}_{name}.npy", values)
        if "caps" in files:
            words = ["a dog", "two cats", "a red bus", "people walking", "a plate of food", "a kite"]
            lines = [f"{words[(i + j) % len(words)]} in picture {i} , view {j} ." for i in range(n) for j in range(5)]
            (folder / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
        if "ids" in files:
            (folder / f"{split}_ids.txt").write_text("".join(f"{100000 + 7 * i + len(split)}\n" for i in range(n)))
    return folder


def assert_same_files(source, exported):
    """The same files under both folders (subfolders included), byte for byte."""
    names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file()) == names
    for name in names:
        assert filecmp.cmp(source / name, exported / name, shallow=False), name


def region_counts(n: int) -> list[int]:
    return [36 - 7 * (i % 3) for i in range(n)]


def write_coco_set(folder, sizes: dict, dim=32, seed=0):
    """A set as the published COCO loader reads it: {split}_ids.txt and, per id, one
    coco_region_features/ID.npy of [K, dim] float32 features (K varies), no {split}_ims.npy."""
    write_set(folder, sizes, files=("segmentations", "seg_maps", "cat_onehots", "caps", "ids"), seed=seed)
    rng = np.random.default_rng(seed + 1)
    (folder / "coco_region_features").mkdir()
    for split, n in sizes.items():
        ids = (folder / f"{split}_ids.txt").read_text().split()
        for image_id, count in zip(ids, region_counts(n)):
            np.save(folder / "coco_region_features" / f"{image_id}.npy", rng.standard_normal((count, dim)).astype(np.float32))
    return folder


def read_as_the_published_coco_loader(loc: str, data_split: str, feature_dir: str = "coco_region_features"):
    """What PrecompRegionDataset (lib/datasets/image_caption_segmentation_sp_se_new.py, 'coco' branch)
    takes from a folder: its file reads, in its order, with its conversions, item by item."""
    captions = []
    with open(os.path.join(loc, "%s_caps.txt" % data_split), "r") as f:
        for line in f:
            captions.append(line.strip())
    image_segmentations = np.load(os.path.join(loc, "%s_segmentations.npy" % data_split))
    image_segmaps = np.load(os.path.join(loc, "%s_seg_maps.npy" % data_split))
    image_cat_onehots = np.load(os.path.join(loc, "%s_cat_onehots.npy" % data_split))
    image_ids = []
    with open(os.path.join(loc, "%s_ids.txt" % data_split), "r") as f:
        for line in f:
            image_ids.append(line.strip())
    im_div = 5 if len(image_ids) != len(captions) else 1
    items = []
    for index in range(len(captions)):
        img_index = index // im_div
        image = torch.Tensor(np.load(os.path.join(loc, feature_dir, image_ids[img_index] + ".npy")))
        items.append(
            (
                image,
                torch.Tensor(image_segmaps[img_index]),
                torch.Tensor(image_cat_onehots[img_index]),
                torch.Tensor(image_segmentations[img_index]),
                captions[index],
                img_index,
            )
        )
    return image_ids, items


def test_import_then_export_is_bit_exact(tmp_path):
    source = write_set(tmp_path / "set", {"train": 6, "dev": 3, "test": 4}, dim=64)
    # what else the published files may be: other dtypes, a big-endian or Fortran-order array,
    # a version 2.0 header, CRLF captions, captions without a final newline
    rng = np.random.default_rng(1)
    np.save(source / "dev_seg_maps.npy", rng.integers(0, 255, (3, 64, 64)).astype(np.int64))
    np.save(source / "dev_cat_onehots.npy", (rng.random((3, CLASSES)) > 0.5).astype(np.uint8))
    np.save(source / "test_segmentations.npy", np.asfortranarray(rng.random((4, CLASSES, 7, 7)).astype(">f4")))
    with open(source / "test_ims.npy", "wb") as handle:
        np.lib.format.write_array(handle, rng.standard_normal((4, 36, 64)).astype(np.float32), version=(2, 0))
    caps = (source / "dev_caps.txt").read_text().splitlines()
    (source / "dev_caps.txt").write_bytes(("\r\n".join(caps) + "\r\n").encode())
    (source / "test_caps.txt").write_text("\n".join((source / "test_caps.txt").read_text().splitlines()))
    (source / "train_ids.txt").write_text((source / "train_ids.txt").read_text().replace("\n", " \n", 1))  # an id with a trailing space

    shnet("import", source, "-o", tmp_path / "cache", "--shard-size", 5)
    exported = tmp_path / "out"
    shnet("export", tmp_path / "cache", "-o", exported, "--split", "train", "--split", "dev", "--split", "test")
    assert_same_files(source, exported)

    cache = Cache(tmp_path / "cache")
    assert cache.recorded_stages() == ["layout", "regions"]
    assert verify_cache(cache).problems == []
    overview = json.loads(shnet("inspect", tmp_path / "cache", "--json").stdout)["cache"]
    assert overview["captions"] == {"dev": 15, "test": 20, "train": 30}
    assert "captions: dev 15, test 20, train 30" in shnet("inspect", tmp_path / "cache").stdout
    images = cache.images()
    assert len(images) == 13 and images["image_id"].iloc[0] == "100003"  # dev first (splits by name), ids from dev_ids.txt
    table = cache.stage_table("regions")
    assert (table["num_boxes"] == 36).all() and (table["status"] == "ok").all()
    features = np.load(source / "train_ims.npy")
    train_ids = (source / "train_ids.txt").read_text().split()
    np.testing.assert_array_equal(cache.read("regions", "features", train_ids[5]), features[5])
    assert cache.read("layout", "seg_map", "100003").dtype == np.float64  # holds dev's int64 and the others' float32 exactly
    captions = pd.read_parquet(tmp_path / "cache" / "captions.parquet")
    assert list(captions.columns) == ["image_id", "caption", "split"] and len(captions) == 65
    assert captions[captions["split"] == "train"]["image_id"].tolist()[:6] == [train_ids[0]] * 5 + [train_ids[1]]


@pytest.mark.parametrize(
    "files",
    [("segmentations", "seg_maps", "cat_onehots", "caps"), ("ims", "ids"), ("caps", "ids"), ("ims", "seg_maps", "caps")],
    ids=["layout-no-ids", "regions-only", "text-only", "mixed"],
)
def test_any_subset_of_files_round_trips(tmp_path, files):
    source = write_set(tmp_path / "set", {"test": 3}, files=files, dim=32)
    shnet("import", source, "-o", tmp_path / "cache")
    cache = Cache(tmp_path / "cache")
    stages = {npy_format.KINDS[name].stage for name in files if name in npy_format.KINDS}
    assert set(cache.recorded_stages()) == stages
    if "ids" not in files:
        assert cache.images()["image_id"].tolist() == ["test/0", "test/1", "test/2"]
    if stages:
        shnet("export", tmp_path / "cache", "-o", tmp_path / "out", "--split", "test")
        assert_same_files(source, tmp_path / "out")
    else:
        result = shnet("export", tmp_path / "cache", "-o", tmp_path / "out", "--split", "test", ok=False)
        assert "neither stage 'regions' nor 'layout'" in result.output


def test_an_image_in_two_splits_is_stored_once(tmp_path):
    source = write_set(tmp_path / "set", {"testall": 5}, dim=16)
    for kind in ("ims", "segmentations", "seg_maps", "cat_onehots"):  # test = the first 2 images of testall, as COCO's 1K fold
        np.save(source / f"test_{kind}.npy", np.load(source / f"testall_{kind}.npy")[:2])
    (source / "test_ids.txt").write_text("".join((source / "testall_ids.txt").read_text().splitlines(keepends=True)[:2]))
    (source / "test_caps.txt").write_text("".join((source / "testall_caps.txt").read_text().splitlines(keepends=True)[:10]))
    shnet("import", source, "-o", tmp_path / "cache")
    assert len(Cache(tmp_path / "cache").images()) == 5
    shnet("export", tmp_path / "cache", "-o", tmp_path / "out", "--split", "test", "--split", "testall")
    assert_same_files(source, tmp_path / "out")

    np.save(source / "test_seg_maps.npy", np.load(source / "test_seg_maps.npy") + 1)
    result = shnet("import", source, "-o", tmp_path / "cache2", ok=False)
    assert "is in splits 'test' and 'testall' with different {split}_seg_maps.npy values" in result.output


@pytest.mark.usefixtures("single_torch_thread")
def test_train_and_evaluate_an_imported_cache_without_a_caption_file(tmp_path):
    source = write_set(tmp_path / "set", {"train": 24, "dev": 6, "test": 6}, dim=16)
    shnet("import", source, "-o", tmp_path / "cache")
    run = tmp_path / "run"
    tiny = ["--embed-size", 16, "--word-dim", 16, "--batch-size", 8, "--workers", 0, "--no-progress", "--device", "cpu"]
    result = shnet("train", "--cache", tmp_path / "cache", "-o", run, "--epochs", 1, "--val-images", 6, *tiny)
    assert "best validation rSum" in result.output
    options = json.loads((run / "options.json").read_text())["options"]
    assert options["captions"] == str(tmp_path.resolve() / "cache" / "captions.parquet")
    for extra in ([], ["--cache", tmp_path / "cache"]):
        metrics = json.loads(shnet("evaluate", run, "--split", "test", "--json", "--workers", 0, "--device", "cpu", *extra).stdout)
        assert set(metrics) and all("rsum" in entry for entry in metrics.values())

    write_stage(tmp_path / "bare", "grid", [f"img{i}" for i in range(4)], {"grid": np.zeros((4, 2, 2, 8), np.float16)}, {"source": "test"})
    result = shnet("train", "--cache", tmp_path / "bare", "-o", tmp_path / "run2", *tiny, ok=False)
    assert "no --captions FILE given and no given cache holds captions" in result.output

    partial = write_set(tmp_path / "partial", {"train": 8, "dev": 2}, files=("ims", "segmentations", "cat_onehots", "caps"), dim=16)
    shnet("import", partial, "-o", tmp_path / "partial-cache")
    result = shnet("train", "--cache", tmp_path / "partial-cache", "-o", tmp_path / "run3", *tiny, ok=False)
    assert "needs array(s) seg_map of stage 'layout'" in result.output


def extracted_cache(root, image_ids, regions: bool, seed=0):
    """A cache as `shnet extract` writes it: fp16 seg_feat, uint8 maps, padded fp16 region features."""
    rng = np.random.default_rng(seed)
    n = len(image_ids)
    layout = {
        "seg_feat": rng.random((n, CLASSES, 7, 7)).astype(np.float16),
        "seg_map": rng.integers(0, 256, (n, 64, 64)).astype(np.uint8),
        "cat_onehot": (rng.random((n, CLASSES)) > 0.8).astype(np.uint8),
    }
    write_stage(root, "layout", image_ids, layout, {"seg_feat": "area"}, shard_size=3)
    arrays = {"layout": layout}
    if regions:
        counts = rng.integers(1, 11, n).astype(np.int32)
        features = rng.standard_normal((n, 10, 32)).astype(np.float16) * (np.arange(10)[None, :, None] < counts[:, None, None])
        arrays["regions"] = {"features": features, "num_boxes": counts}
        write_stage(root, "regions", image_ids, arrays["regions"], {"num_boxes": 10}, table={"num_boxes": counts}, shard_size=3)
    return arrays


@pytest.mark.parametrize("regions", [False, True], ids=["layout-only", "regions+layout"])
def test_export_of_an_extracted_cache_follows_the_caption_file(tmp_path, regions):
    image_ids = [f"val2014/COCO_val2014_{i:012d}" for i in range(8)]
    arrays = extracted_cache(tmp_path / "cache", image_ids, regions)
    order = [5, 0, 7, 2]  # the caption file's image order, not the cache's
    rows = [{"image_id": f"{image_ids[i]}.jpg", "caption": f"caption {j} of image {i}", "split": "test"} for i in order for j in range(5)]
    rows += [{"image_id": f"{image_ids[1]}.jpg", "caption": "a training caption", "split": "train"}]
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)

    shnet("export", tmp_path / "cache", "--captions", tmp_path / "captions.csv", "--split", "test", "-o", tmp_path / "out")
    out = tmp_path / "out"
    expected = {"test_segmentations.npy", "test_seg_maps.npy", "test_cat_onehots.npy", "test_ids.txt", "test_caps.txt"}
    assert {p.name for p in out.iterdir()} == expected | ({"test_ims.npy"} if regions else set())
    seg_feat = np.load(out / "test_segmentations.npy")
    assert seg_feat.dtype == np.float32 and seg_feat.shape == (4, CLASSES, 7, 7)
    np.testing.assert_array_equal(seg_feat, arrays["layout"]["seg_feat"][order].astype(np.float32))
    np.testing.assert_array_equal(np.load(out / "test_seg_maps.npy"), arrays["layout"]["seg_map"][order])
    np.testing.assert_array_equal(np.load(out / "test_cat_onehots.npy"), arrays["layout"]["cat_onehot"][order])
    if regions:
        ims = np.load(out / "test_ims.npy")
        assert ims.dtype == np.float32 and ims.shape == (4, 10, 32)
        np.testing.assert_array_equal(ims, arrays["regions"]["features"][order].astype(np.float32))
    assert (out / "test_ids.txt").read_text().splitlines() == [image_ids[i] for i in order]
    assert (out / "test_caps.txt").read_text().splitlines()[5:7] == ["caption 0 of image 0", "caption 1 of image 0"]

    # exported, then imported again: the same arrays under the same ids
    shnet("import", out, "-o", tmp_path / "again")
    again = Cache(tmp_path / "again")
    assert again.images()["image_id"].tolist() == [image_ids[i] for i in order]
    np.testing.assert_array_equal(again.read("layout", "seg_map", image_ids[7]), arrays["layout"]["seg_map"][7])


def test_export_refuses_images_the_cache_lacks_and_odd_caption_counts(tmp_path):
    image_ids = [f"img{i}" for i in range(4)]
    extracted_cache(tmp_path / "cache", image_ids, regions=False)
    rows = [{"image_id": name, "caption": f"caption {j}", "split": "test"} for name in ["img0", "ghost1", "ghost2"] for j in range(5)]
    pd.DataFrame(rows).to_csv(tmp_path / "missing.csv", index=False)
    result = shnet("export", tmp_path / "cache", "--captions", tmp_path / "missing.csv", "--split", "test", "-o", tmp_path / "o1", ok=False)
    assert "2 of 3 images of split 'test'" in result.output and "ghost1, ghost2" in result.output
    assert not (tmp_path / "o1").exists()

    rows = [{"image_id": name, "caption": f"caption {j}", "split": "test"} for name, count in [("img0", 5), ("img1", 4)] for j in range(count)]
    pd.DataFrame(rows).to_csv(tmp_path / "short.csv", index=False)
    result = shnet("export", tmp_path / "cache", "--captions", tmp_path / "short.csv", "--split", "test", "-o", tmp_path / "o2", ok=False)
    assert "needs 5 captions per image" in result.output and "img1 (4)" in result.output

    result = shnet("export", tmp_path / "cache", "--split", "test", "-o", tmp_path / "o3", ok=False)
    assert "was not made by `shnet import`; give --captions FILE" in result.output


def record_reads_and_writes(monkeypatch, chunk_bytes: int) -> tuple[list, list]:
    """Blocks of ``chunk_bytes``; every np.load's keyword arguments and every (array, rows) written."""
    monkeypatch.setattr(npy_format, "CHUNK_BYTES", chunk_bytes)
    loads, written = [], []
    real_load, real_write = np.load, ShardWriter.write
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    monkeypatch.setattr(ShardWriter, "write", lambda self, name, rows, values: written.append((name, len(values))) or real_write(self, name, rows, values))
    return loads, written


def test_streaming_reads_and_writes_bounded_chunks(tmp_path, monkeypatch):
    source = write_set(tmp_path / "set", {"train": 11}, dim=64)
    row_bytes = 36 * 64 * 4
    loads, written = record_reads_and_writes(monkeypatch, 3 * row_bytes)  # 3 images of features per block
    shnet("import", source, "-o", tmp_path / "cache", "--shard-size", 4)
    assert loads and all(k.get("mmap_mode") == "r" and not k.get("allow_pickle") for k in loads)
    feature_blocks = [size for name, size in written if name == "features"]
    assert sum(feature_blocks) == 11 and max(feature_blocks) <= 3 and len(feature_blocks) >= 5  # blocks split at shard ends too

    read = []
    real_read = ShardRows.read
    monkeypatch.setattr(ShardRows, "read", lambda self, stage, name, s, r: read.append((name, len(s))) or real_read(self, stage, name, s, r))
    shnet("export", tmp_path / "cache", "-o", tmp_path / "out", "--split", "train")
    feature_reads = [size for name, size in read if name == "features"]
    assert sum(feature_reads) == 11 and max(feature_reads) <= 3
    assert_same_files(source, tmp_path / "out")


def test_malformed_sets_get_one_clear_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("nothing here")
    assert "holds no file of a SCAN/3SHNet precomputed set" in shnet("import", empty, "-o", tmp_path / "c0", ok=False).output

    uneven = write_set(tmp_path / "uneven", {"test": 4}, dim=8)
    np.save(uneven / "test_seg_maps.npy", np.zeros((3, 64, 64), np.float32))
    result = shnet("import", uneven, "-o", tmp_path / "c1", ok=False)
    assert "the files of split 'test' disagree on the number of images" in result.output and "test_seg_maps.npy 3" in result.output

    caps = write_set(tmp_path / "caps", {"test": 4}, dim=8)
    (caps / "test_caps.txt").write_text("one caption\n" * 19)
    result = shnet("import", caps, "-o", tmp_path / "c2", ok=False)
    assert "test_caps.txt has 19 lines for 4 images" in result.output and "--captions-per-image" in result.output
    (caps / "test_caps.txt").write_text("one caption\n" * 4)
    shnet("import", caps, "-o", tmp_path / "c3", "--captions-per-image", 1)

    pickled = write_set(tmp_path / "pickled", {"test": 2}, files=("caps",))
    np.save(pickled / "test_ims.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert "never unpickles" in shnet("import", pickled, "-o", tmp_path / "c4", ok=False).output

    mixed = write_set(tmp_path / "mixed", {"train": 3, "test": 2}, dim=8)
    (mixed / "test_ims.npy").unlink()
    result = shnet("import", mixed, "-o", tmp_path / "c5", ok=False)
    assert "the splits have different .npy files" in result.output and "--split" in result.output
    shnet("import", mixed, "-o", tmp_path / "c6", "--split", "test")
    assert Cache(tmp_path / "c6").recorded_stages() == ["layout"]

    assert "not empty" in shnet("import", mixed, "-o", tmp_path / "c6", "--split", "test", ok=False).output


def test_export_of_a_cache_made_by_extract_for_the_published_loaders(tmp_path, extract):
    """Real `shnet extract --stages layout` (panoptic from COCO-format annotations) on generated
    scenes with a Karpathy split, exported in the split's order and imported again."""
    from shnet.demo.dataset import DatasetSettings, generate_dataset

    data = generate_dataset(tmp_path / "data", DatasetSettings(images=10, max_side=64, val_images=2, test_images=3))
    coco = ["--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={data.panoptic_json}"]
    extract(data.images, "-o", tmp_path / "cache", "--stages", "layout", *coco)
    shnet("export", tmp_path / "cache", "--captions", data.captions, "--split", "test", "-o", tmp_path / "out")

    out = tmp_path / "out"
    karpathy = [e for e in json.loads(data.captions.read_text())["images"] if e["split"] == "test"]
    assert (out / "test_ids.txt").read_text().splitlines() == [e["filename"].removesuffix(".jpg") for e in karpathy]
    assert (out / "test_caps.txt").read_text().splitlines() == [s["raw"].strip() for e in karpathy for s in e["sentences"][:5]]
    assert not (out / "test_ims.npy").exists()
    cache = Cache(tmp_path / "cache")
    for name, array, dtype, shape in (
        ("segmentations", "seg_feat", np.float32, (CLASSES, 7, 7)),
        ("seg_maps", "seg_map", np.uint8, (64, 64)),
        ("cat_onehots", "cat_onehot", np.uint8, (CLASSES,)),
    ):
        exported = np.load(out / f"test_{name}.npy")
        assert exported.dtype == dtype and exported.shape == (3, *shape)
        for i, entry in enumerate(karpathy):
            np.testing.assert_array_equal(exported[i], cache.read("layout", array, entry["filename"].removesuffix(".jpg")))
    shnet("import", out, "-o", tmp_path / "again")
    shnet("export", tmp_path / "again", "--split", "test", "-o", tmp_path / "again-out")
    assert_same_files(out, tmp_path / "again-out")


def test_per_image_region_files_import_and_export_byte_for_byte(tmp_path, monkeypatch):
    source = write_coco_set(tmp_path / "set", {"train": 7, "test": 5})
    features = source / "coco_region_features"
    # what else the published files may be: an id with a '/' (a subfolder) and a trailing space in the
    # ids file, a big-endian Fortran-order file, a version 2.0 header, float16 values
    ids = (source / "test_ids.txt").read_text().splitlines()
    (features / "val2014").mkdir()
    (features / f"{ids[1]}.npy").rename(features / "val2014" / f"{ids[1]}.npy")
    ids[1] = f"val2014/{ids[1]} "
    (source / "test_ids.txt").write_text("\n".join(ids) + "\n")
    rng = np.random.default_rng(2)
    np.save(features / f"{ids[2]}.npy", np.asfortranarray(rng.standard_normal((22, 32)).astype(">f4")))
    with open(features / f"{ids[3]}.npy", "wb") as handle:
        np.lib.format.write_array(handle, rng.standard_normal((36, 32)).astype(np.float32), version=(2, 0))
    np.save(features / f"{ids[4]}.npy", rng.standard_normal((29, 32)).astype(np.float16))

    real_load = np.load
    loads, written = record_reads_and_writes(monkeypatch, 3 * 36 * 32 * 4)  # 3 images of features per block
    shnet("import", source, "-o", tmp_path / "cache", "--shard-size", 4)
    monkeypatch.setattr(np, "load", real_load)
    assert len(loads) >= 12 and all(k.get("mmap_mode") == "r" and not k.get("allow_pickle") for k in loads)
    feature_blocks = [size for name, size in written if name == "features"]
    assert sum(feature_blocks) == 12 and max(feature_blocks) <= 3

    cache = Cache(tmp_path / "cache")
    assert "val2014/100011" in cache.images()["image_id"].tolist()  # the id as the loader strips it
    table = cache.stage_table("regions").set_index("image_id")
    train_ids = (source / "train_ids.txt").read_text().split()
    assert table.loc[train_ids, "num_boxes"].tolist() == region_counts(7)
    stored = cache.read("regions", "features", train_ids[1])
    assert stored.shape == (36, 32) and not stored[29:].any()
    np.testing.assert_array_equal(stored[:29], np.load(features / f"{train_ids[1]}.npy"))
    np.testing.assert_array_equal(cache.read("regions", "features", ids[2].strip())[:22], np.load(features / f"{ids[2]}.npy"))

    shnet("export", tmp_path / "cache", "-o", tmp_path / "out", "--split", "train", "--split", "test")
    assert_same_files(source, tmp_path / "out")

    # the same cache as whole-split files, and per-image under another folder name
    result = shnet("export", tmp_path / "cache", "-o", tmp_path / "whole", "--split", "test", "--region-features", "whole-split")
    assert "3 of 5 images have fewer than 36 regions" in result.output
    ims = np.load(tmp_path / "whole" / "test_ims.npy")
    assert ims.shape == (5, 36, 32) and ims.dtype == np.float32 and not (tmp_path / "whole" / "coco_region_features").exists()
    shnet("export", tmp_path / "cache", "-o", tmp_path / "feats", "--split", "test", "--features-dir", "feats")
    exported = sorted(str(p.relative_to(tmp_path / "feats" / "feats")) for p in (tmp_path / "feats" / "feats").rglob("*.npy"))
    assert exported == sorted(f"{i.strip()}.npy" for i in ids)
    assert all(filecmp.cmp(features / name, tmp_path / "feats" / "feats" / name, shallow=False) for name in exported)


@pytest.mark.parametrize("regions", ["per-image", "whole-split"])
def test_per_image_export_reads_as_the_published_coco_loader_reads_it(tmp_path, regions):
    image_ids = [f"val2014/COCO_val2014_{i:012d}" for i in range(6)]
    arrays = extracted_cache(tmp_path / "cache", image_ids, regions=True)
    order = [4, 1, 5]
    rows = [{"image_id": f"{image_ids[i]}.jpg", "caption": f"caption {j} of image {i}", "split": "test"} for i in order for j in range(5)]
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)
    shnet("export", tmp_path / "cache", "--captions", tmp_path / "captions.csv", "--split", "test", "-o", tmp_path / "out", "--region-features", regions)
    out = tmp_path / "out"
    if regions == "whole-split":  # the default layout, as before: {split}_ims.npy, no folder
        assert (out / "test_ims.npy").is_file() and not (out / "coco_region_features").exists()
        return
    assert not (out / "test_ims.npy").exists()  # the COCO loader never reads it
    loaded_ids, items = read_as_the_published_coco_loader(str(out), "test")
    assert loaded_ids == [image_ids[i] for i in order] and len(items) == 15
    for index, (image, segmentation, cat_onehot, unet_seg, caption, img_index) in enumerate(items):
        source = order[img_index]
        assert img_index == index // 5 and caption == f"caption {index % 5} of image {source}"
        assert image.dtype == torch.float32 and image.shape == (10, 32)  # every stored row, zero past num_boxes
        np.testing.assert_array_equal(image.numpy(), arrays["regions"]["features"][source].astype(np.float32))
        np.testing.assert_array_equal(segmentation.numpy(), arrays["layout"]["seg_map"][source].astype(np.float32))
        np.testing.assert_array_equal(cat_onehot.numpy(), arrays["layout"]["cat_onehot"][source].astype(np.float32))
        np.testing.assert_array_equal(unet_seg.numpy(), arrays["layout"]["seg_feat"][source].astype(np.float32))
    assert np.load(out / "coco_region_features" / f"{image_ids[4]}.npy").dtype == np.float32

    shnet("import", out, "-o", tmp_path / "again")
    again = Cache(tmp_path / "again")
    np.testing.assert_array_equal(again.read("regions", "features", image_ids[5]), arrays["regions"]["features"][5])
    shnet("export", tmp_path / "again", "--split", "test", "-o", tmp_path / "again-out")
    assert_same_files(out, tmp_path / "again-out")


def test_ids_that_would_leave_the_features_folder_are_refused_before_writing(tmp_path):
    image_ids = ["img0", "../evil", "/etc/evil"]
    extracted_cache(tmp_path / "cache", image_ids, regions=True)
    rows = [{"image_id": image_id, "caption": f"caption {j}", "split": "test"} for image_id in image_ids for j in range(5)]
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)
    out = tmp_path / "sub" / "out"
    result = shnet("export", tmp_path / "cache", "--captions", tmp_path / "captions.csv", "--split", "test", "-o", out, "--region-features", "per-image", ok=False)
    assert "2 image id(s) name no file inside coco_region_features/" in result.output and "'../evil', '/etc/evil'" in result.output
    assert not (tmp_path / "sub").exists() and "Traceback" not in result.output

    source = write_coco_set(tmp_path / "set", {"test": 2})
    (source / "test_ids.txt").write_text("100004\n../100011\n")
    result = shnet("import", source, "-o", tmp_path / "c1", ok=False)
    assert "test_ids.txt: 1 image id(s) name no file inside" in result.output and "'../100011'" in result.output
    assert not (tmp_path / "c1").exists()


def test_malformed_per_image_sets_get_one_clear_message(tmp_path):
    def refused(source, *extra) -> str:
        cache = tmp_path / f"cache{len(list(tmp_path.iterdir()))}"
        result = shnet("import", source, "-o", cache, *extra, ok=False)
        assert not cache.exists() and "Traceback" not in result.output
        return " ".join(result.output.split())

    source = write_coco_set(tmp_path / "set", {"test": 3})
    features = source / "coco_region_features"
    ids = (source / "test_ids.txt").read_text().split()
    good = features / f"{ids[1]}.npy"
    kept = good.read_bytes()

    good.unlink()
    assert f"{good} is missing: test_ids.txt lists '{ids[1]}'" in refused(source)
    np.save(good, np.zeros((2, 29, 32), np.float32))
    assert f"{good} has shape [2, 29, 32]; a per-image region file holds [K, D]" in refused(source)
    np.save(good, np.zeros((29, 16), np.float32))
    assert f"{good} holds 16-d region features, {features / ids[0]}.npy 32-d" in refused(source)
    np.save(good, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert f"{good} holds pickled objects" in refused(source)
    good.write_bytes(kept[:-100])
    assert f"{good} is truncated" in refused(source)
    good.write_bytes(kept)

    assert "is not a folder; --features-dir names the folder of per-image" in refused(source, "--features-dir", "elsewhere")
    assert "is not a folder inside the set" in refused(source, "--features-dir", "../set/coco_region_features")
    np.save(source / "test_ims.npy", np.zeros((3, 36, 32), np.float32))
    assert "no split reads" in refused(source, "--features-dir", "coco_region_features")

    shnet("import", source, "-o", tmp_path / "whole")  # test_ims.npy present: the whole-split file, as before
    assert Cache(tmp_path / "whole").stage_table("regions")["num_boxes"].tolist() == [36, 36, 36]
    result = shnet("export", tmp_path / "whole", "--split", "test", "-o", tmp_path / "o1", "--features-dir", "feats", ok=False)
    assert "add --region-features per-image" in result.output
    extracted_cache(tmp_path / "layout-only", ["a", "b"], regions=False)
    pd.DataFrame({"image_id": ["a"] * 5, "caption": "c", "split": "test"}).to_csv(tmp_path / "caps.csv", index=False)
    args = ("--captions", tmp_path / "caps.csv", "--split", "test", "-o", tmp_path / "o2", "--region-features", "per-image")
    assert "has no stage 'regions'; per-image region features need it" in shnet("export", tmp_path / "layout-only", *args, ok=False).output
