"""Stage `panoptic`: a tiny random-initialised Mask2Former folder on real photos, COCO-format
annotations, label sets, refusals; and `shnet train --level grid` on a cache that extract made."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from shnet.cache import Cache
from shnet.cli import main
from shnet.data import coco_panoptic_categories
from shnet.errors import ShnetError
from shnet.pipeline import segmaps
from shnet.pipeline.models.panoptic_labels import match_labels, normalise_label
from shnet.pipeline.segmaps import VOID
from shnet.pipeline.stages.panoptic import SEGMENT_COLUMNS, PanopticStage

from panoptic_helpers import blocky_annotations, tiny_mask2former, tiny_oneformer, write_annotations

CATEGORIES = coco_panoptic_categories()
OVERLAP0 = ["--set", "panoptic.overlap_threshold=0"]  # the random queries then make several segments per image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_mask2former(tmp_path_factory.mktemp("m2f") / "tiny-mask2former")




def stage_options(model_dir):
    return PanopticStage().resolve_config({"model": str(model_dir), "overlap_threshold": 0.0})


# --- hf backend -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_cache(model_dir, mixed_dir, tmp_path_factory, extract):
    cache = tmp_path_factory.mktemp("hf") / "cache"
    extract(mixed_dir, "-o", cache, "--profile", "panoptic-coco", "--stages", "panoptic", "--set", f"panoptic.model={model_dir}", *OVERLAP0, "--set", "panoptic.resolution=96", "--batch-size", 3)
    return cache


def test_mask2former_folder_through_the_stage_on_real_photos(hf_cache):
    cache = Cache(hf_cache)
    table = cache.stage_table("panoptic")
    images = cache.images().set_index("image_id")
    good = table[~table["image_id"].str.startswith("bad/")]
    assert (good["status"] == "ok").all() and (table.loc[table["image_id"].str.startswith("bad/"), "status"] == "error").all()
    assert (good["height"].to_numpy() == images.loc[good["image_id"], "height"].to_numpy()).all()
    segments = cache.stage_table("panoptic", table="segments")
    assert list(segments.columns) == SEGMENT_COLUMNS + ["shard"]
    assert len(segments) > 0 and segments["score"].between(0, 1).all()
    assert (segments["category_name"] == [CATEGORIES[c].name for c in segments["category"]]).all()
    assert (segments["is_thing"] == [CATEGORIES[c].is_thing for c in segments["category"]]).all()
    counts = segments.groupby("image_id").size()
    assert (good.set_index("image_id")["num_segments"] == counts.reindex(good["image_id"]).fillna(0).astype(int).to_numpy()).all()
    with h5py.File(hf_cache / "panoptic" / "00000.h5") as h5:
        assert h5["class_map"].shape[1:] == (96, 96) and h5["class_map"].dtype == np.uint8
        assert h5["probs"].shape[1:] == (133, 7, 7) and h5["probs"].dtype == np.float16 and h5["map_hw"].dtype == np.int16
        for _, entry in good.iterrows():
            row = int(entry["row"])
            h, w = h5["map_hw"][row]
            assert (h, w) == segmaps.stored_shape(int(entry["height"]), int(entry["width"]), 96)
            stored = h5["class_map"][row]
            assert (stored[h:, :] == VOID).all() and (stored[:, w:] == VOID).all()
            valid = stored[:h, :w]
            assert set(np.unique(valid[valid != VOID])) <= set(segments.loc[segments["image_id"] == entry["image_id"], "category"])
            assert np.isfinite(h5["probs"][row].astype(np.float32)).all() and h5["probs"][row].max() > 0
            image_segments = segments[segments["image_id"] == entry["image_id"]]
            assert image_segments["area"].sum() <= entry["height"] * entry["width"]
            assert ((image_segments["bbox_x"] + image_segments["bbox_w"]) <= entry["width"]).all()


def test_batched_results_equal_single_image_results_of_the_library(model_dir, photo_dir, single_torch_thread):
    """Padding images of different sizes into one batch shifts no segment: each image's result equals
    the library's own post-processing of that image run alone."""
    import torch

    from shnet.pipeline.images import decode_image
    from shnet.pipeline.models.panoptic_hf import infer, load_hf_panoptic, preprocess

    config = stage_options(model_dir)
    bundle = load_hf_panoptic(str(model_dir), None, "cpu")
    rgbs = [decode_image(str(p)) for p in sorted(photo_dir.rglob("*.*"))[:4]]
    assert len({r.shape for r in rgbs}) > 1
    batched = infer(bundle, [preprocess(r, bundle) for r in rgbs], config, "cpu")
    for rgb, result in zip(rgbs, batched):
        inputs = bundle.processor(images=[rgb], return_tensors="pt")
        with torch.inference_mode():
            out = bundle.model(**inputs)
        alone = bundle.processor.post_process_panoptic_segmentation(
            out, threshold=0.5, mask_threshold=0.5, overlap_mask_area_threshold=0.0, label_ids_to_fuse=bundle.fuse, target_sizes=[rgb.shape[:2]]
        )[0]
        ids = alone["segmentation"].numpy()
        expected = np.full(ids.shape, VOID, np.uint8)
        for s in alone["segments_info"]:
            expected[ids == s["id"]] = bundle.lut[s["label_id"]]
        assert (result.class_map != expected).mean() < 0.002  # float rounding of batched vs single convolutions


def test_an_image_where_nothing_is_found_gets_an_all_void_map(model_dir, photo_dir):
    from shnet.pipeline.images import decode_image
    from shnet.pipeline.models.panoptic_hf import infer, load_hf_panoptic, preprocess
    from shnet.pipeline.stages.panoptic import stage_output

    bundle = load_hf_panoptic(str(model_dir), None, "cpu")
    rgb = decode_image(str(next(photo_dir.rglob("*.jpg"))))
    options = {**stage_options(model_dir), "threshold": 1.0}  # no softmax score is above 1
    (result,) = infer(bundle, [preprocess(rgb, bundle)], options, "cpu")
    out = stage_output([result], 96, "opencv")
    assert result.segments == [] and (out.arrays["class_map"] == VOID).all() and out.scalars["num_segments"][0] == 0
    assert out.arrays["probs"].max() > 0  # the probability volume does not depend on the threshold
    h, w = out.arrays["map_hw"][0]
    semantic = out.arrays["semantic_map"][0]
    assert (semantic[:h, :w] != VOID).all() and (semantic[h:] == VOID).all() and (semantic[:, w:] == VOID).all()


def smooth_class_volume(rng, shape: tuple[int, int], regions: int = 12) -> np.ndarray:
    """[133, h, w] class probabilities with a few regions, each led by one class (so most pixels'
    neighbours share their most probable class and some, at region borders, do not)."""
    h, w = shape
    centres = rng.random((regions, 2)) * [h, w]
    owner = np.argmin(((np.indices(shape).reshape(2, -1).T[:, None] - centres) ** 2).sum(-1), 1).reshape(shape)
    volume = rng.random((133, h, w)).astype(np.float32) * 0.5
    classes = rng.choice(133, regions, replace=False)
    volume[classes[owner], *np.indices(shape)] += 0.5
    return volume


@pytest.mark.parametrize("volume_hw, full_hw, resolution, sampling", [((96, 128), (480, 640), 320, "opencv"), ((40, 31), (150, 113), 96, "centre"), ((25, 6), (1000, 70), 512, "opencv")])
def test_most_probable_class_equals_the_dense_bilinear_blend_at_every_stored_pixel(volume_hw, full_hw, resolution, sampling):
    """The shortcut (pixels whose four volume samples agree take their class) and the blend at the
    other pixels equal the straightforward computation: the whole volume blended in float64 with
    dense interpolation matrices, then the argmax; only float ties (top two within 1e-5) may differ."""
    rng = np.random.default_rng(sum(volume_hw))
    volume = smooth_class_volume(rng, volume_hw)
    height, width = full_hw
    stored_h, stored_w = segmaps.stored_shape(height, width, resolution)

    def dense(source, full, stored):
        taps = segmaps.bilinear_taps(source, full, segmaps.stored_sample_indices(full, stored, sampling))
        matrix = np.zeros((stored, source))
        np.add.at(matrix, (np.arange(stored), taps.low), taps.low_weight)
        np.add.at(matrix, (np.arange(stored), taps.high), taps.high_weight)
        return matrix

    blended = np.einsum("ry,cyx,sx->crs", dense(volume_hw[0], height, stored_h), volume.astype(np.float64), dense(volume_hw[1], width, stored_w), optimize=True)
    expected = blended.argmax(0)
    np.put_along_axis(runner_up := blended.copy(), expected[None], -np.inf, 0)
    clear = blended.max(0) - runner_up.max(0) > 1e-5
    for layout in (volume, np.moveaxis(np.ascontiguousarray(np.moveaxis(volume, 0, -1)), -1, 0)):  # as given, and a view of class-last memory
        got = segmaps.stored_most_probable(layout, full_hw, resolution, sampling)
        assert got.shape == (stored_h, stored_w) and got.dtype == np.uint8
        np.testing.assert_array_equal(got[clear], expected[clear])
    leading = np.unique(volume.argmax(0))
    # most stored pixels lie inside a region, where the shortcut applies; at borders, blends make other classes win
    assert clear.mean() > 0.99 and 0.5 < np.isin(expected, leading).mean() < 1


def test_coco_classes_sum_model_classes_in_the_order_of_np_add_at():
    import torch

    from shnet.pipeline.models.panoptic_hf import _coco_classes

    rng = np.random.default_rng(3)
    lut = rng.integers(0, 133, 150).astype(np.uint8)  # several model classes per COCO class
    lut[rng.random(150) < 0.2] = VOID
    values = rng.random((150, 5, 4)).astype(np.float32)
    expected = np.zeros((133, 5, 4), np.float32)
    np.add.at(expected, lut[lut != VOID], values[lut != VOID])
    np.testing.assert_array_equal(_coco_classes(lut, torch.from_numpy(values), 0).numpy(), expected)
    np.testing.assert_array_equal(_coco_classes(lut, torch.from_numpy(np.moveaxis(values, 0, -1).copy()), 2).numpy(), np.moveaxis(expected, 0, -1))


def test_probability_volumes_equal_the_library_semantic_combination():
    """Pooled probabilities exactly as before (queries' class probabilities times the pooled sigmoid
    masks, model classes summed per COCO class), and the per-pixel volume equal to that combination
    at every pixel up to float rounding, though it sums classes before weighting and is class-last."""
    import torch
    import torch.nn.functional as F

    from shnet.pipeline.models.panoptic_hf import _probabilities

    rng = np.random.default_rng(4)
    lut = np.concatenate([np.arange(133), rng.integers(0, 133, 20)]).astype(np.uint8)
    lut[[3, 140]] = VOID
    class_logits = torch.from_numpy(rng.normal(size=(30, 154)).astype(np.float32))
    masks = torch.from_numpy(rng.normal(size=(30, 24, 20)).astype(np.float32) * 3)
    pooled, per_pixel = _probabilities(lut, class_logits, masks)

    def straightforward(mask_probs):
        model = torch.einsum("qc,qhw->chw", class_logits.softmax(-1)[:, :-1], mask_probs).numpy()
        out = np.zeros((133, *model.shape[1:]), np.float32)
        np.add.at(out, lut[lut != VOID], model[lut != VOID])
        return out

    np.testing.assert_array_equal(pooled, straightforward(F.adaptive_avg_pool2d(masks.sigmoid()[None], 7)[0]))
    assert per_pixel.shape == (133, 24, 20) and np.moveaxis(per_pixel, 0, -1).flags.c_contiguous
    np.testing.assert_allclose(per_pixel, straightforward(masks.sigmoid()), rtol=1e-5, atol=1e-7)


def test_oneformer_folder_runs_offline_with_its_tokenizer_and_is_refused_without(photo_dir, tmp_path):
    from shnet.pipeline.images import decode_image
    from shnet.pipeline.models.panoptic_hf import infer, preprocess

    folder = tiny_oneformer(tmp_path / "tiny-oneformer")
    stage = PanopticStage()
    config = stage.resolve_config({"model": str(folder), "overlap_threshold": 0.0, "threshold": 0.0})
    stage.check(config)
    bundle = stage.load(config, "cpu")
    assert bundle.kind == "oneformer" and bundle.task_inputs.shape == (1, 16)
    rgbs = [decode_image(str(p)) for p in sorted(photo_dir.rglob("*.jpg"))[:3]]
    results = infer(bundle, [preprocess(r, bundle) for r in rgbs], config, "cpu")
    for rgb, result in zip(rgbs, results):
        assert result.class_map.shape == rgb.shape[:2] and result.probs.shape == (133, 7, 7) and result.probs.max() > 0
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ShnetError, match="OneFormer folder needs its text tokenizer"):
        PanopticStage().check(PanopticStage().resolve_config({"model": str(folder)}))


def test_label_names_match_after_normalisation():
    assert len({normalise_label(c.name) for c in CATEGORIES}) == len(CATEGORIES)
    lut = match_labels({0: "Person", 1: "wall", 2: "sky_other", 3: "door stuff", 4: "playingfield"}, {}, "model", None)
    names = [CATEGORIES[i].name for i in lut]
    assert names == ["person", "wall-other-merged", "sky-other-merged", "door-stuff", "playingfield"]


def test_a_model_with_another_label_set_is_refused_naming_the_labels(tmp_path, photo_dir, extract):
    labels = {c.index: c.name for c in CATEGORIES}
    labels[3], labels[100] = "motorbike-ish", "lava"
    folder = tiny_mask2former(tmp_path / "other-labels", id2label=labels)
    result = extract(photo_dir, "-o", tmp_path / "c", "--stages", "panoptic", "--set", f"panoptic.model={folder}", ok=False)
    assert result.exit_code == 1
    assert "2 label(s) that match no COCO panoptic class: 'motorbike-ish', 'lava'" in result.output and "panoptic.label_map=FILE" in result.output
    assert not (tmp_path / "c").exists()
    mapping = tmp_path / "labels.yaml"
    mapping.write_text("motorbike-ish: motorcycle\nlava: null\n")
    config = PanopticStage().resolve_config({"model": str(folder), "label_map": str(mapping)})
    PanopticStage().check(config)
    from shnet.pipeline.models.panoptic_hf import label_lookup

    lut = label_lookup(str(folder), str(mapping))
    assert CATEGORIES[lut[3]].name == "motorcycle" and lut[100] == VOID
    mapping.write_text('{"lava": "magma"}')
    with pytest.raises(ShnetError, match="'magma' is not a COCO panoptic class name"):
        label_lookup(str(folder), str(mapping))


def test_broken_model_folders_are_refused_in_the_client(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    stage = PanopticStage()
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights.pop("class_predictor.weight")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ShnetError, match="do not match the model's config.*class_predictor.weight"):
        stage.check(stage.resolve_config({"model": str(broken)}))
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ShnetError, match="no preprocessor_config.json or processor_config.json"):
        stage.check(stage.resolve_config({"model": str(broken)}))
    with pytest.raises(ShnetError, match="not a Hugging Face model folder"):
        stage.check(stage.resolve_config({"model": str(tmp_path)}))
    with pytest.raises(ShnetError, match="panoptic.resolution must be between 64"):
        stage.resolve_config({"model": str(model_dir), "resolution": 32})


# --- coco backend ---------------------------------------------------------------------------------


def test_coco_annotations_become_the_stage_output(photo_dir, tmp_path, extract):
    sizes = {p.stem: Image.open(p).size[::-1] for p in sorted(photo_dir.rglob("*.*"))}
    del sizes["rocket"]  # an image without annotation: an error row, not a failed shard
    json_path, made = blocky_annotations(tmp_path / "ann", sizes)
    cache = tmp_path / "cache"
    extract(photo_dir, "-o", cache, "--stages", "panoptic", "--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={json_path}")
    store = Cache(cache)
    table = store.stage_table("panoptic").set_index("image_id")
    assert table.loc["things/rocket", "status"] == "error" and "no annotation for image 'rocket'" in table.loc["things/rocket", "error"]
    segments = store.stage_table("panoptic", table="segments")
    assert segments["score"].isna().all()
    index = {c.id: c.index for c in CATEGORIES}
    with h5py.File(cache / "panoptic" / "00000.h5") as h5:
        assert not h5["probs"][:].any()
        for image_id, entry in table.drop(index="things/rocket").iterrows():
            ids, made_segments = made[image_id.split("/")[-1]]
            full = np.full(ids.shape, VOID, np.uint8)
            for sid, cid in made_segments:
                full[ids == sid] = index[cid]
            h, w = h5["map_hw"][entry["row"]]
            np.testing.assert_array_equal(h5["class_map"][entry["row"], :h, :w], segmaps.downsample_for_storage(full, 320, "opencv"))
            assert (h5["semantic_map"][entry["row"]] == VOID).all()  # annotations carry no probabilities
            mine = segments[segments["image_id"] == image_id].set_index("segment")
            for sid, cid in made_segments:
                ys, xs = np.nonzero(ids == sid)
                assert mine.loc[sid, "category"] == index[cid] and mine.loc[sid, "area"] == len(ys)
                assert tuple(mine.loc[sid, ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]]) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)


def test_bad_annotation_files_are_refused_in_check(tmp_path):
    stage = PanopticStage()

    def check(annotations, **more):
        stage.check(stage.resolve_config({"backend": "coco", "annotations": str(annotations), **more}))

    with pytest.raises(ShnetError, match="panoptic.annotations: no file or folder"):
        check(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    (tmp_path / "bad").mkdir()
    with pytest.raises(ShnetError, match="is not valid JSON"):
        check(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ShnetError, match="needs an 'annotations' list"):
        check(bad)
    ids = np.ones((8, 8), np.int64)
    unknown = write_annotations(tmp_path / "unknown", {"a": (ids, [(1, 999)])})
    with pytest.raises(ShnetError, match=r"category ids \[999\]"):
        check(unknown)
    no_dir = write_annotations(tmp_path / "nodir", {"a": (ids, [(1, 1)])})
    with pytest.raises(ShnetError, match="PNG folder .* not found"):
        check(no_dir, annotation_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ShnetError, match="panoptic.model is not used by panoptic.backend=coco"):
        stage.resolve_config({"backend": "coco", "annotations": str(no_dir), "model": "x"})


def test_detectron2_backend_runs_where_detectron2_is_installed():
    pytest.importorskip("detectron2")
    with pytest.raises(ShnetError, match="config.yaml"):
        PanopticStage().check(PanopticStage().resolve_config({"backend": "detectron2", "model": "/nonexistent"}))


def test_detectron2_backend_is_refused_clearly_without_detectron2(tmp_path):
    try:
        import detectron2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("detectron2 is installed here")
    (tmp_path / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: PanopticFPN\n")
    (tmp_path / "model_final.pkl").write_bytes(b"")
    with pytest.raises(ShnetError, match="needs detectron2, which is not installed"):
        PanopticStage().check(PanopticStage().resolve_config({"backend": "detectron2", "model": str(tmp_path)}))


# --- images -> panoptic -> layout -> train ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["coco", pytest.param("hf", marks=pytest.mark.slow)])
def test_train_grid_level_on_a_cache_made_by_extract(backend, photo_dir, tmp_path, single_torch_thread, extract):
    if backend == "coco":
        sizes = {p.stem: Image.open(p).size[::-1] for p in sorted(photo_dir.rglob("*.*"))}
        json_path, _ = blocky_annotations(tmp_path / "ann", sizes)
        panoptic = ["--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={json_path}"]
    else:
        panoptic = ["--set", f"panoptic.model={tiny_mask2former(tmp_path / 'm2f')}", *OVERLAP0]
    cache = tmp_path / "cache"
    extract(photo_dir, "-o", cache, "--stages", "grid,panoptic,layout", "--profile", "smoke", "--set", "grid.input_size=64", *panoptic)
    ids = Cache(cache).images()["image_id"].tolist()
    words = ["cat", "rocket", "coffee", "flower", "city", "person", "camera"]
    rows = [(image_id, f"a photo of a {words[i]} number {j}", "train" if i < 5 else "val") for i, image_id in enumerate(ids) for j in range(5)]
    pd.DataFrame(rows, columns=["image_id", "caption", "split"]).to_csv(tmp_path / "captions.csv", index=False)
    result = CliRunner().invoke(
        main,
        ["train", "--cache", str(cache), "--captions", str(tmp_path / "captions.csv"), "-o", str(tmp_path / "run"), "--level", "grid",
         "--epochs", "1", "--batch-size", "4", "--embed-size", "16", "--word-dim", "16", "--workers", "0", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and "rsum" in json.dumps(metrics).lower()
