"""The cache schema: one definition of every stage's arrays, the stages built from it, the
valid-rows rule, and ``verify`` checking stored shapes and dtypes against it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from shnet.cache import Cache, schema, write_stage
from shnet.cache.inspect import verify_cache
from shnet.cli import main
from shnet.data import coco_panoptic_categories
from shnet.pipeline.stages import get_stage

SHNET = Path(__file__).resolve().parents[1] / "shnet"


def test_the_label_set_constants_are_the_coco_panoptic_ones():
    assert schema.NUM_CLASSES == len(coco_panoptic_categories()) == 133
    assert (schema.VOID, schema.SEG_MAP_SIZE, schema.SEG_CELLS, schema.REGION_FEATURE_DIM) == (255, 64, 7, 2048)
    assert schema.VOID >= schema.NUM_CLASSES  # void is never a class id


@pytest.mark.parametrize(
    "stage, config, model, sizes",
    [
        ("grid", {"input_size": 96}, SimpleNamespace(stride=32, channels=24), {"G": 3, "C": 24}),
        ("saliency", {"resolution": 40}, None, {"S": 40}),
        ("regions", {"slots": 5}, None, {"K": 5, "D": 2048}),
        ("panoptic", {"resolution": 80}, None, {"R": 80}),
        ("layout", {}, None, {}),
    ],
)
def test_each_stage_declares_the_schemas_arrays(stage, config, model, sizes):
    outputs = get_stage(stage).outputs(config, model)
    assert outputs == schema.specs(stage, list(outputs), **sizes)
    stored = {name: (spec.shape, np.dtype(spec.dtype)) for name, spec in outputs.items()}
    assert schema.check_arrays(stage, stored) == []


def test_layout_region_arrays_follow_the_regions_k():
    outputs = get_stage("layout").region_outputs(6, with_saliency=True)
    assert outputs == schema.specs("layout", schema.LAYOUT_REGION_ARRAYS, K=6)
    assert set(get_stage("layout").region_outputs(6, with_saliency=False)) == {"region_class_hist", "region_geometry"}
    assert outputs["region_class_hist"].shape == (6, schema.NUM_CLASSES)


def test_padded_arrays_name_their_companion_count():
    regions = schema.STAGE_ARRAYS["regions"]
    assert {name for name, a in regions.items() if a.valid_count == ("regions", "num_boxes")} == {
        "features", "boxes", "object_class", "object_score", "attr_class", "attr_score"
    }
    assert schema.STAGE_ARRAYS["layout"]["region_geometry"].valid_count == ("regions", "num_boxes")
    assert schema.STAGE_ARRAYS["grid"]["grid"].valid_count == ("grid", "valid_hw")
    assert schema.STAGE_ARRAYS["layout"]["seg_map"].fill == schema.VOID


def test_valid_rows_mask_and_cells():
    padded = np.arange(12).reshape(4, 3)
    np.testing.assert_array_equal(schema.valid_rows(padded, np.int32(2)), padded[:2])
    assert schema.valid_rows(padded, 0).shape == (0, 3)
    np.testing.assert_array_equal(schema.valid_mask(np.array([0, 2, 4]), 4), [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    grid = np.arange(3 * 3 * 2).reshape(3, 3, 2)
    np.testing.assert_array_equal(schema.valid_cells(grid, (2, 1)), [[0, 1], [6, 7]])
    np.testing.assert_array_equal(schema.valid_area(grid[..., 0], np.array([1, 2], np.int16)), [[0, 2]])


def test_filled_arrays_start_at_each_arrays_fill():
    arrays = schema.filled("layout", 2, schema.LAYOUT_INPUTS)
    assert arrays["seg_map"].shape == (2, 64, 64) and (arrays["seg_map"] == schema.VOID).all() and arrays["seg_map"].dtype == np.uint8
    assert arrays["seg_feat"].dtype == np.float16 and not arrays["seg_feat"].any()


def test_check_arrays_names_wrong_shapes_dtypes_and_symbols():
    good = {"features": ((4, 16), "float16"), "boxes": ((4, 4), "float32"), "num_boxes": ((), "int32")}
    assert schema.check_arrays("regions", good) == []
    bad_k = dict(good, boxes=((5, 4), "float32"))
    assert schema.check_arrays("regions", bad_k) == ["array 'boxes' has per-image shape (5, 4), so K=5, but 'features' gives K=4"]
    bad_fixed = {"seg_map": ((64, 32), "uint8"), "cat_onehot": ((80,), "uint8")}
    assert schema.check_arrays("layout", bad_fixed) == [
        "array 'seg_map' has per-image shape (64, 32), the schema says (64, 64)",
        "array 'cat_onehot' has per-image shape (80,), the schema says (133,)",
    ]
    assert schema.check_arrays("grid", {"grid": ((3, 2, 8), "float16")}) == [
        "array 'grid' has per-image shape (3, 2, 8), so G=2, but its other axes give G=3"
    ]
    assert schema.check_arrays("regions", dict(good, num_boxes=((), "float64"))) == ["array 'num_boxes' has dtype float64, the schema says int32"]
    assert "is not one stage 'saliency' stores" in schema.check_arrays("saliency", {"heat": ((4, 4), "float16")})[0]
    imported = {"seg_map": ((64, 64), "float32"), "seg_feat": ((133, 7, 7), ">f4")}
    assert schema.check_arrays("layout", imported, imported=True) == []
    assert schema.check_arrays("layout", imported) != []
    assert schema.check_arrays("not-a-stage", {"x": ((1,), "int8")}) == []


def _regions_cache(root: Path, boxes: np.ndarray, config: dict | None = None) -> Cache:
    ids = [f"img{i}" for i in range(len(boxes))]
    counts = np.array([2, 3, 1, 4][: len(ids)], np.int32)
    features = np.zeros((len(ids), 4, 16), np.float16)
    return write_stage(
        root, "regions", ids, {"features": features, "boxes": boxes, "num_boxes": counts}, config or {"synthetic": True},
        table={"num_boxes": counts}, shard_size=2,
    )


def test_verify_accepts_a_cache_as_the_schema_defines_it(tmp_path):
    cache = _regions_cache(tmp_path / "cache", np.zeros((4, 4, 4), np.float32))
    result = verify_cache(cache)
    assert result.problems == [] and result.checked_shards == 2


def test_verify_names_each_shard_whose_array_has_a_wrong_shape(tmp_path):
    cache = _regions_cache(tmp_path / "cache", np.zeros((4, 5, 4), np.float32))  # 5 box rows, 4 feature rows
    problems = verify_cache(cache).problems
    assert len(problems) == 2
    for shard, problem in enumerate(problems):
        assert problem.startswith(f"regions shard {shard}: arrays not as the schema defines stage 'regions': ")
        assert "array 'features' has per-image shape (4, 16), so K=4, but 'boxes' gives K=5" in problem  # HDF5 lists names sorted
        assert f"{shard:05d}.done" in problem and "shnet extract" in problem
    result = CliRunner().invoke(main, ["verify", str(cache.root)])
    assert result.exit_code != 0 and "regions shard 1: arrays not as the schema defines stage 'regions'" in result.output


def test_verify_names_a_wrong_dtype_unless_the_stage_was_imported(tmp_path):
    boxes = np.zeros((4, 4, 4), np.float64)
    problems = verify_cache(_regions_cache(tmp_path / "made", boxes)).problems
    assert len(problems) == 2 and "array 'boxes' has dtype float64, the schema says float32" in problems[0]
    imported = _regions_cache(tmp_path / "imported", boxes, {"source": schema.IMPORT_SOURCE})
    assert verify_cache(imported).problems == []


def test_the_schema_and_the_cache_reader_need_no_torch():
    code = "import sys, shnet.cache.schema, shnet.cache.features; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nothing_under_the_trainer_opens_hdf5_itself():
    importers = []
    for path in sorted((SHNET / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "h5py" for name in names):
                importers.append(path.name)
    assert importers == []


def test_verify_names_layout_region_arrays_of_another_k_than_the_regions(tmp_path):
    cache = _regions_cache(tmp_path / "cache", np.zeros((4, 4, 4), np.float32))
    layout = {"region_geometry": np.zeros((4, 3, schema.GEOMETRY_DIM), np.float32), "cat_onehot": np.zeros((4, schema.NUM_CLASSES), np.uint8)}
    cache = write_stage(cache.root, "layout", [f"img{i}" for i in range(4)], layout, {"synthetic": True}, shard_size=2)
    problems = verify_cache(cache).problems
    assert len(problems) == 2 and all(p.startswith("layout shard") for p in problems)
    assert "array 'region_geometry' has per-image shape (3, 7), so K=3, but 'regions/boxes' gives K=4" in problems[0]
