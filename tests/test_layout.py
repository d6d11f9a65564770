"""Stage `layout` and its computations: known answers on hand-made maps, then through `shnet extract`."""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from shnet.cache import Cache, write_stage
from shnet.cli import main
from shnet.data import coco_panoptic_categories
from shnet.pipeline import segmaps
from shnet.cache.schema import VOID
from shnet.pipeline.stages import with_dependencies

from panoptic_helpers import blocky_annotations


def opencv_nearest(full: np.ndarray) -> np.ndarray:
    """3SHNet's early loader: ``cv2.resize(segmap.astype(float32), None, fx=64/w, fy=64/h, INTER_NEAREST)``."""
    h, w = full.shape
    return cv2.resize(full.astype(np.float32), None, fx=64 / w, fy=64 / h, interpolation=cv2.INTER_NEAREST).astype(np.uint8)


def torch_nearest(full: np.ndarray, size=(64, 64)) -> np.ndarray:
    """The pixel-centre nearest-neighbour resize as torch computes it (mode nearest-exact)."""
    tensor = torch.from_numpy(full.astype(np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)


@pytest.mark.parametrize(
    "shape, resolution",
    [((480, 640), 320), ((427, 640), 320), ((333, 500), 320), ((1000, 70), 320), ((50, 40), 320), ((64, 300), 64), ((97, 1301), 100),
     ((2000, 2000), 320), ((373, 186), 320), ((396, 501), 320), ((411, 613), 128)],
)
@pytest.mark.parametrize("sampling, reference", [("opencv", opencv_nearest), ("centre", torch_nearest)])
def test_seg_map_from_the_stored_map_equals_the_full_resolution_resize(shape, resolution, sampling, reference):
    full = np.random.default_rng(sum(shape)).integers(0, 134, size=shape).astype(np.uint8)
    full[full == 133] = VOID
    stored = segmaps.downsample_for_storage(full, resolution, sampling)
    assert max(stored.shape) <= resolution and min(stored.shape) >= min(64, min(shape))
    np.testing.assert_array_equal(segmaps.seg_map_from_stored(stored, sampling), reference(full))


def test_opencv_indices_follow_opencv_float_rounding_not_exact_division():
    # 186 * 32 / 64 = 93 exactly, but OpenCV's floor(32 * (1 / (64 / 186))) reads 92
    assert segmaps.opencv_nearest_indices(186, 64)[32] == 92
    for width in (186, 198, 372, 1001, 4096, 37):
        row = np.arange(width, dtype=np.float32)[None].repeat(2, 0)
        expected = cv2.resize(row, None, fx=64 / width, fy=1.0, interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
        np.testing.assert_array_equal(segmaps.opencv_nearest_indices(width, 64), expected)


def test_the_two_samplings_differ_on_striped_maps():
    full = np.tile((np.arange(640) % 2).astype(np.uint8), (333, 1))  # one-pixel stripes: 10j is even, 10j + 5 odd
    opencv = segmaps.seg_map_from_stored(segmaps.downsample_for_storage(full, 320, "opencv"), "opencv")
    centre = segmaps.seg_map_from_stored(segmaps.downsample_for_storage(full, 320, "centre"), "centre")
    assert (opencv != centre).all()


@pytest.mark.parametrize("sampling", segmaps.SAMPLINGS)
def test_stored_map_is_a_nearest_neighbour_down_sampling(sampling):
    full = np.repeat(np.repeat(np.arange(100).reshape(10, 10) % 133, 48, axis=0), 64, axis=1).astype(np.uint8)  # 480x640 blocks
    stored = segmaps.downsample_for_storage(full, 320, sampling)
    assert stored.shape == (240, 320)
    # every stored pixel reads a full-resolution pixel of its own footprint's block
    np.testing.assert_array_equal(stored, torch_nearest(full, (240, 320)))


def test_cell_area_fractions_known_answers():
    class_map = np.full((14, 14), VOID, np.uint8)
    class_map[:, :7] = 3  # left half
    class_map[:4, 7:] = 9  # top-right strip, 4 rows
    fractions = segmaps.cell_area_fractions(class_map)
    assert fractions.shape == (133, 7, 7)
    np.testing.assert_array_equal(fractions[3][:, :3], 1.0)
    np.testing.assert_allclose(fractions[3][:, 3], 0.5)  # column 3 spans pixels 6..7
    np.testing.assert_allclose(fractions[9][:2, 4:], 1.0)
    np.testing.assert_allclose(fractions[9][2:, 4:], 0.0)
    np.testing.assert_allclose(fractions[9][:2, 3], 0.5)
    assert fractions.sum(0).max() <= 1.0 and fractions.sum(0).min() == 0.0  # void-only cells sum to 0


def test_cell_area_fractions_equal_adaptive_average_pooling_of_the_one_hot_map():
    class_map = np.random.default_rng(1).integers(0, 134, size=(23, 31)).astype(np.uint8)
    class_map[class_map == 133] = VOID
    one_hot = np.zeros((133, 23, 31), np.float32)
    rows, cols = np.nonzero(class_map != VOID)
    one_hot[class_map[rows, cols], rows, cols] = 1
    expected = F.adaptive_avg_pool2d(torch.from_numpy(one_hot)[None], 7)[0].numpy()
    np.testing.assert_allclose(segmaps.cell_area_fractions(class_map), expected, atol=1e-6)


def test_float16_rounding_keeps_cells_at_most_one():
    fractions = segmaps.cell_area_fractions(np.random.default_rng(2).integers(0, 133, size=(320, 213)).astype(np.uint8))
    half = segmaps.float16_at_most(fractions)
    assert half.dtype == np.float16 and (half.astype(np.float32) <= fractions).all()
    assert half.astype(np.float64).sum(0).max() <= 1.0
    assert np.abs(half.astype(np.float32) - fractions).max() < 1e-3


def test_present_classes_follow_the_100_pixel_rule():
    onehot = segmaps.present_classes([5, 5, 7, 9, 132], [60, 41, 100, 101, 5000])
    assert onehot.dtype == np.uint8 and onehot.shape == (133,)
    assert np.nonzero(onehot)[0].tolist() == [5, 9, 132]  # 60 + 41 > 100; exactly 100 is not more than 100
    assert segmaps.present_classes([], []).sum() == 0


def test_box_histograms_saliency_and_geometry_known_answers():
    class_map = np.full((50, 100), VOID, np.uint8)  # a 200x400 image stored at half size
    class_map[:, :50] = 4
    class_map[:25, 50:] = 8
    boxes = np.array([[0, 0, 100, 100], [100, 0, 300, 100], [200, 0, 400, 200], [10, 10, 10.5, 10.5]], np.float32)
    hist = segmaps.box_class_histograms(class_map, boxes, (200, 400))
    np.testing.assert_allclose(hist[0, 4], 1.0)
    np.testing.assert_allclose(hist[1, [4, 8]], [0.5, 0.5])
    np.testing.assert_allclose(hist[2, 8], 0.5)  # lower half of that box is void
    assert hist[2].sum() == pytest.approx(0.5)
    np.testing.assert_allclose(hist[3, 4], 1.0)  # a sub-pixel box reads the pixel holding its centre
    saliency = np.zeros((10, 10), np.float16)
    saliency[:5, :] = 1.0  # top half of the image salient
    mean = segmaps.box_mean_saliency(saliency, boxes[:3], (200, 400))
    np.testing.assert_allclose(mean, [1.0, 1.0, 0.5])
    geometry = segmaps.box_geometry(boxes[:3], (200, 400))
    np.testing.assert_allclose(geometry[0], [0, 0, 0.25, 0.5, 0.25, 0.5, 0.125])
    np.testing.assert_allclose(geometry[2], [0.5, 0, 1.0, 1.0, 0.5, 1.0, 0.5])


def test_segments_from_an_id_map():
    ids = np.zeros((6, 8), np.int64)
    ids[1:3, 2:6] = 70001  # segment of class 12
    ids[4:6, 0:2] = 5  # segment of class 100
    ids[0, 7] = 9  # a segment whose class maps to void
    class_map, segments = segmaps.segments_from_id_map(ids, {70001: 12, 5: 100, 9: VOID})
    assert class_map[1, 2] == 12 and class_map[5, 1] == 100 and class_map[0, 7] == VOID and class_map[0, 0] == VOID
    by_id = {s["segment"]: s for s in segments}
    assert set(by_id) == {70001, 5}
    assert by_id[70001]["area"] == 8 and by_id[70001]["bbox"] == (2, 1, 4, 2)
    assert by_id[5]["category"] == 100 and by_id[5]["bbox"] == (0, 4, 2, 2)


def test_layout_runs_after_the_stages_it_uses_when_they_run_too():
    assert with_dependencies(["layout"]) == ["probe", "panoptic", "layout"]
    order = with_dependencies(["layout", "saliency", "regions"])
    assert order.index("saliency") < order.index("layout") and order.index("regions") < order.index("layout")


# --- the stage through `shnet extract` ------------------------------------------------------------


@pytest.fixture(scope="module")
def annotated(photo_dir, tmp_path_factory):
    """The test photos with hand-made COCO panoptic annotations at their full resolution."""
    from PIL import Image

    root = tmp_path_factory.mktemp("layout-annotations")
    sizes = {p.stem: Image.open(p).size[::-1] for p in sorted(photo_dir.rglob("*.*"))}
    json_path, made = blocky_annotations(root, sizes, seed=3)
    return json_path, made




def test_layout_stage_matches_direct_computations_on_the_full_resolution_maps(photo_dir, annotated, tmp_path, extract):
    json_path, made = annotated
    cache = tmp_path / "cache"
    coco = ["--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={json_path}", "--set", "panoptic.resolution=96"]
    extract(photo_dir, "-o", cache, "--stages", "panoptic,saliency", *coco, "--set", "saliency.resolution=32")
    images = Cache(cache).images()
    ids = images["image_id"].tolist()
    # hand-made regions: boxes in image pixels, a different count per image, K = 4
    k, rng = 4, np.random.default_rng(0)
    hw = images[["height", "width"]].to_numpy().astype(np.int32)
    counts = np.array([4, 0, 2, 1, 3, 4, 1][: len(ids)], np.int32)
    boxes = np.zeros((len(ids), k, 4), np.float32)
    for i, (h, w) in enumerate(hw):
        for j in range(counts[i]):
            x1, y1 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
            boxes[i, j] = [x1, y1, min(w, x1 + rng.uniform(2, w * 0.4)), min(h, y1 + rng.uniform(2, h * 0.4))]
    write_stage(cache, "regions", ids, {"boxes": boxes, "num_boxes": counts, "image_hw": hw}, {"source": "hand-made"}, table={"num_boxes": counts})
    extract(photo_dir, "-o", cache, "--stages", "layout", *coco, "--set", "saliency.resolution=32", "--set", "layout.void=keep")

    index = {c.id: c.index for c in coco_panoptic_categories()}
    table = Cache(cache).stage_table("layout")
    assert (table["status"] == "ok").all(), table
    with h5py.File(cache / "layout" / "00000.h5") as h5, h5py.File(cache / "panoptic" / "00000.h5") as pan, h5py.File(cache / "saliency" / "00000.h5") as sal:
        assert h5["seg_feat"].dtype == np.float16 and h5["seg_map"].dtype == np.uint8 and h5["cat_onehot"].dtype == np.uint8
        assert h5["region_class_hist"].shape == (len(ids), k, 133) and h5["region_geometry"].shape == (len(ids), k, 7)
        for i, image_id in enumerate(ids):
            segment_ids, segments = made[image_id.split("/")[-1]]
            full = np.full(segment_ids.shape, VOID, np.uint8)
            areas = {}
            for sid, cid in segments:
                full[segment_ids == sid] = index[cid]
                areas[index[cid]] = areas.get(index[cid], 0) + int((segment_ids == sid).sum())
            np.testing.assert_array_equal(h5["seg_map"][i], opencv_nearest(full))
            expected_present = sorted(c for c, a in areas.items() if a > 100)
            assert np.nonzero(h5["cat_onehot"][i])[0].tolist() == expected_present
            h, w = pan["map_hw"][i]
            stored = pan["class_map"][i, :h, :w]
            np.testing.assert_array_equal(h5["seg_feat"][i], segmaps.float16_at_most(segmaps.cell_area_fractions(stored)))
            n = counts[i]
            np.testing.assert_allclose(h5["region_geometry"][i, :n], segmaps.box_geometry(boxes[i, :n], tuple(hw[i])), rtol=1e-6)
            np.testing.assert_allclose(
                h5["region_saliency"][i, :n], segmaps.box_mean_saliency(sal["saliency"][i], boxes[i, :n], tuple(hw[i])), atol=1e-3
            )
            hist = h5["region_class_hist"][i].astype(np.float32)
            np.testing.assert_allclose(hist[:n], segmaps.box_class_histograms(stored, boxes[i, :n], tuple(hw[i])), atol=1e-3)
            assert not hist[n:].any() and not h5["region_geometry"][i, n:].any()


def stuff_first_index() -> np.ndarray:
    """UPSNet's order written out from the category list: COCO's stuff classes, then its things."""
    categories = coco_panoptic_categories()
    order = [c.index for c in categories if not c.is_thing] + [c.index for c in categories if c.is_thing]
    new = np.full(256, VOID, np.int64)
    new[order] = np.arange(len(order))
    return new


def test_upsnet_order_is_stuff_first_and_a_permutation():
    lut = segmaps.class_order_lut("upsnet")
    np.testing.assert_array_equal(lut[:133], stuff_first_index()[:133])
    assert sorted(lut[:133]) == list(range(133)) and lut[VOID] == VOID
    names = segmaps.category_names()
    assert names[int(np.argmax(lut[:133] == 53))] == "person" and lut[0] == 53  # COCO's first thing
    np.testing.assert_array_equal(segmaps.class_order_lut("coco"), np.arange(256))


def nearest_labelled_distances(class_map: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance from every pixel to the nearest labelled (non-void) pixel, brute force."""
    ys, xs = np.nonzero(class_map != VOID)
    grid_y, grid_x = np.indices(class_map.shape)
    d2 = (grid_y[..., None] - ys) ** 2 + (grid_x[..., None] - xs) ** 2
    return np.sqrt(d2.min(-1))


def test_fill_void_takes_the_nearest_labelled_class_or_the_most_probable_one():
    rng = np.random.default_rng(4)
    class_map = np.full((41, 57), VOID, np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, 35), rng.integers(0, 50)
        class_map[y : y + rng.integers(2, 7), x : x + rng.integers(2, 8)] = rng.integers(0, 133)
    filled = segmaps.fill_void(class_map)
    labelled = class_map != VOID
    assert (filled != VOID).all() and (filled[labelled] == class_map[labelled]).all()
    exact = nearest_labelled_distances(class_map)
    for y, x in zip(*np.nonzero(~labelled)):
        same = np.argwhere(class_map == filled[y, x])
        reached = np.sqrt(((same - (y, x)) ** 2).sum(1)).min()
        assert reached <= exact[y, x] * 1.03 + 0.5, (y, x, reached, exact[y, x])  # OpenCV's 5x5 chamfer distance
    most_probable = rng.integers(0, 133, class_map.shape).astype(np.uint8)
    most_probable[:, :10] = VOID  # no probability there: nearest labelled pixel
    both = segmaps.fill_void(class_map, most_probable)
    assert (both[labelled] == class_map[labelled]).all()
    np.testing.assert_array_equal(both[~labelled & (most_probable != VOID)], most_probable[~labelled & (most_probable != VOID)])
    assert (both != VOID).all()
    assert (segmaps.fill_void(np.full((5, 5), VOID, np.uint8)) == VOID).all()  # nothing to take a class from


def test_most_probable_class_at_the_stored_pixels_equals_a_full_resolution_bilinear_upsampling():
    rng = np.random.default_rng(5)
    volume = rng.random((133, 24, 18)).astype(np.float32)
    full_hw, resolution = (150, 113), 96
    upsampled = F.interpolate(torch.from_numpy(volume)[None], size=full_hw, mode="bilinear", align_corners=False)[0].numpy()
    expected = segmaps.downsample_for_storage(upsampled.argmax(0).astype(np.uint8), resolution, "opencv")
    got = segmaps.stored_most_probable(volume, full_hw, resolution, "opencv")
    assert got.shape == expected.shape and (got == expected).mean() > 0.999  # float ties aside


def test_default_layout_fills_void_and_upsnet_order_permutes_every_array(photo_dir, annotated, tmp_path, extract):
    json_path, made = annotated
    coco = ["--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={json_path}", "--set", "panoptic.resolution=96"]
    extract(photo_dir, "-o", tmp_path / "coco", "--stages", "layout", *coco, "--set", "layout.seg_feat=area")
    extract(photo_dir, "-o", tmp_path / "upsnet", "--stages", "layout", *coco, "--set", "layout.class_order=upsnet")
    index = {c.id: c.index for c in coco_panoptic_categories()}
    new = stuff_first_index()
    ids = Cache(tmp_path / "coco").images()["image_id"].tolist()
    with h5py.File(tmp_path / "coco" / "layout" / "00000.h5") as a, h5py.File(tmp_path / "upsnet" / "layout" / "00000.h5") as b:
        assert a.attrs["class_order"] == "coco" and b.attrs["class_order"] == "upsnet"
        assert json.loads(b.attrs["class_names"])[53] == "person" and json.loads(a.attrs["class_names"])[0] == "person"
        for i, image_id in enumerate(ids):
            segment_ids, segments = made[image_id.split("/")[-1]]
            full = np.full(segment_ids.shape, VOID, np.uint8)
            for sid, cid in segments:
                full[segment_ids == sid] = index[cid]
            seg_map = a["seg_map"][i]
            reference = opencv_nearest(full)
            assert (seg_map != VOID).all() and (reference == VOID).any()  # the maps have void; the default fills it
            np.testing.assert_array_equal(seg_map[reference != VOID], reference[reference != VOID])
            assert set(np.unique(seg_map)) <= set(np.unique(full[full != VOID]))
            np.testing.assert_array_equal(b["seg_map"][i], new[seg_map])
            coco_present = np.nonzero(a["cat_onehot"][i])[0]
            assert sorted(new[coco_present]) == np.nonzero(b["cat_onehot"][i])[0].tolist()
            np.testing.assert_array_equal(b["seg_feat"][i][new[:133]], a["seg_feat"][i])
            assert a["seg_feat"][i].astype(np.float64).sum(0).min() > 0.99  # no void left in any cell


def test_layout_without_regions_and_from_probabilities(photo_dir, annotated, tmp_path, extract):
    json_path, _ = annotated
    cache = tmp_path / "cache"
    extract(photo_dir, "-o", cache, "--stages", "layout", "--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={json_path}",
            "--set", "layout.seg_feat=probs", "--set", "layout.void=keep")
    with h5py.File(cache / "layout" / "00000.h5") as h5, h5py.File(cache / "panoptic" / "00000.h5") as pan:
        assert set(h5) == {"seg_feat", "seg_map", "cat_onehot"}
        np.testing.assert_array_equal(h5["seg_feat"][:], pan["probs"][:])  # coco backend: zeros
    assert pd.read_parquet(cache / "layout" / "table")["status"].eq("ok").all()


def test_layout_options_and_missing_model_are_refused_before_anything_runs(photo_dir, annotated, tmp_path):
    json_path, _ = annotated
    result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(tmp_path / "c"), "--stages", "layout"])
    assert result.exit_code == 1
    assert "--set panoptic.model=/path/to/" in result.output and "--set panoptic.backend=coco" in result.output
    coco = ["--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={json_path}"]
    result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(tmp_path / "c"), "--stages", "layout", *coco, "--set", "layout.seg_feat=mean"])
    assert result.exit_code == 1 and "layout.seg_feat must be one of area, probs (got 'mean')" in result.output
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_one_extract_runs_regions_saliency_panoptic_and_layout_in_order(photo_dir, annotated, tmp_path, extract):
    """The real regions stage (random-initialised, small) in the same run, on two Dask workers: layout
    waits for it and describes exactly its boxes."""
    json_path, _ = annotated
    cache = tmp_path / "cache"
    extract(photo_dir, "-o", cache, "--stages", "layout,regions,saliency", "--set", "panoptic.backend=coco", "--set", f"panoptic.annotations={json_path}",
            "--set", "regions.weights=random", "--set", "regions.depth=50", "--set", "regions.min_size=96", "--set", "regions.max_size=160",
            "--set", "regions.post_nms_topk=12", "--set", "regions.num_boxes=6", "--set", "saliency.resolution=32",
            "--workers", 2, cluster=True)
    with h5py.File(cache / "layout" / "00000.h5") as h5, h5py.File(cache / "regions" / "00000.h5") as reg:
        assert h5["region_class_hist"].shape[1:] == (6, 133) and "region_saliency" in h5
        for row in range(len(reg["num_boxes"])):
            n = int(reg["num_boxes"][row])
            hw = tuple(int(v) for v in reg["image_hw"][row])
            np.testing.assert_allclose(h5["region_geometry"][row, :n], segmaps.box_geometry(reg["boxes"][row, :n], hw), rtol=1e-6)
            assert not h5["region_geometry"][row, n:].any()
