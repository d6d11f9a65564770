"""shnet show: panels of a cache holding every stage (boxes drawn where the cache says, category
colours, saliency, grid norm, GPO pooling weights of a run) and the static HTML contact sheet."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from shnet.cache import Cache, ShardWriter, write_stage
from shnet.fileio import atomic_write_parquet
from shnet.cache.store import record_stage_config
from shnet.cli import main
from shnet.data import coco_panoptic_categories
from shnet.show.panels import BOX_COLOURS, all_panels, category_palette, compose, regions_panel
from shnet.show.pooling import region_pooling_weights, token_shares
from shnet.show.view import read_view

GREY = 128
FLAT_BOXES = np.array([[20, 30, 100, 90], [110, 12, 150, 70]], dtype=np.float32)  # on the 160x120 flat image
PERSON = next(c.index for c in coco_panoptic_categories() if c.name == "person")
SKY = next(c.index for c in coco_panoptic_categories() if c.name.startswith("sky"))
IDS = ["flat", "photos/cat"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _hex(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Two images (a flat grey picture and a real photo) with every stage written through the cache API."""
    import skimage.data

    root = tmp_path_factory.mktemp("show")
    Image.new("RGB", (160, 120), (GREY, GREY, GREY)).save(root / "flat.png")
    cat = Image.fromarray(skimage.data.chelsea())
    cat.thumbnail((200, 200))
    cat.save(root / "cat.jpg")
    sizes = [(120, 160), (cat.height, cat.width)]

    k, dim = 4, 16
    boxes = np.zeros((2, k, 4), np.float32)
    boxes[0, :2] = FLAT_BOXES
    boxes[1, :3] = [[10, 10, 90, 80], [60, 40, 180, 130], [5, 5, 40, 30]]
    regions = {
        "features": np.random.default_rng(0).standard_normal((2, k, dim)).astype(np.float16),
        "boxes": boxes,
        "num_boxes": np.array([2, 3], np.int32),
        "object_class": np.array([[3, 7, 0, 0], [1, 2, 3, 0]], np.int16),
        "object_score": np.array([[0.9, 0.5, 0, 0], [0.8, 0.7, 0.6, 0]], np.float32),
        "attr_class": np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.int16),
        "attr_score": np.array([[0.6, 0.0, 0, 0], [0.3, 0.2, 0, 0]], np.float32),
        "image_hw": np.array(sizes, np.int32),
    }
    names = {"object_names": ["cat", "dog", "sofa", "window", "tree", "car", "sky", "lamp"], "attribute_names": ["red", "wooden"]}
    write_stage(root / "cache", "regions", IDS, regions, {"synthetic": True}, table={"num_boxes": [2, 3]}, attrs=names)
    cache = Cache(root / "cache")
    atomic_write_parquet(
        cache.root / "images.parquet",
        cache.images().assign(path=[str(root / "flat.png"), str(root / "cat.jpg")], height=[s[0] for s in sizes], width=[s[1] for s in sizes]),
    )
    _write_panoptic(cache, sizes)
    saliency = np.zeros((2, 32, 32), np.float16)
    saliency[:, :, 16:] = 1.0  # the right half salient
    write_stage(cache.root, "saliency", IDS, {"saliency": saliency}, {"synthetic": True})
    grid = np.zeros((2, 4, 4, 8), np.float16)
    grid[:, 0, 0] = 3.0
    write_stage(cache.root, "grid", IDS, {"grid": grid, "valid_hw": np.full((2, 2), 4, np.int16)}, {"resize": "stretch", "input_size": 128})
    seg_map = np.full((2, 64, 64), SKY, np.uint8)
    layout = {"seg_feat": np.zeros((2, 133, 7, 7), np.float16), "seg_map": seg_map, "cat_onehot": np.eye(133, dtype=np.uint8)[[SKY, PERSON]]}
    write_stage(cache.root, "layout", IDS, layout, {"synthetic": True})
    return cache


def _write_panoptic(cache: Cache, sizes) -> None:
    """class_map at resolution 64 (the flat image: 64x48 valid; left half person, right half sky)
    and the segments table, written shard by shard as a stage does."""
    config = {"backend": "synthetic", "resolution": 64}
    record_stage_config(cache, "panoptic", config)
    class_map = np.full((2, 64, 64), 255, np.uint8)
    map_hw = np.zeros((2, 2), np.int16)
    segments = []
    for i, (height, width) in enumerate(sizes):
        h, w = round(64 * height / max(height, width)), round(64 * width / max(height, width))
        class_map[i, :h, : w // 2], class_map[i, :h, w // 2 : w] = PERSON, SKY
        map_hw[i] = (h, w)
        for segment, (category, left) in enumerate(((PERSON, 0), (SKY, width // 2))):
            segments.append((IDS[i], segment + 1, category, coco_panoptic_categories()[category].name, category == PERSON, height * width // 2, left, 0, width // 2, height, np.nan))
    columns = ["image_id", "segment", "category", "category_name", "is_thing", "area", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "score"]
    with ShardWriter(cache, "panoptic", 0, 2, {"config": config}) as writer:
        for name, values in (("class_map", class_map), ("map_hw", map_hw), ("probs", np.zeros((2, 133, 7, 7), np.float16))):
            writer.create(name, values.shape[1:], values.dtype)
            writer.write(name, slice(0, 2), values)
        writer.add_table("segments", pd.DataFrame(segments, columns=columns))
        writer.commit(pd.DataFrame({"image_id": IDS, "row": [0, 1], "status": "ok", "error": "", "seconds": 0.0, "num_segments": [2, 2]}))


def test_panels_are_written_with_boxes_where_the_cache_says(cache, tmp_path):
    out = tmp_path / "flat.png"
    result = CliRunner().invoke(main, ["show", str(cache.root), "flat", "-o", str(out)])
    assert result.exit_code == 0, result.output
    view = read_view(cache, "flat")
    panels = all_panels(view)
    assert [p.title.split(":")[0].split(" (")[0] for p in panels] == ["flat", "regions", "panoptic", "saliency", "grid feature norm"]
    expected, offsets = compose(panels)
    written = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (written == np.asarray(expected)).all()

    (ox, oy), (sx, sy) = offsets[1], panels[1].scale
    for i, (x1, y1, x2, y2) in enumerate(FLAT_BOXES):
        colour = _hex(BOX_COLOURS[i])
        middle_y, middle_x = oy + round((y1 + y2) / 2 * sy), ox + round((x1 + x2) / 2 * sx)
        edges = {"left": written[middle_y, ox + round(x1 * sx) - 1 : ox + round(x1 * sx) + 2],
                 "right": written[middle_y, ox + round(x2 * sx) - 1 : ox + round(x2 * sx) + 2],
                 "bottom": written[oy + round(y2 * sy) - 1 : oy + round(y2 * sy) + 2, middle_x]}
        for edge, pixels in edges.items():
            assert np.abs(pixels - colour).sum(axis=1).min() < 60, (i, edge, pixels, colour)
        inside = written[middle_y, ox + round(x1 * sx) + 6]
        assert np.abs(inside - GREY).max() <= 2, (i, inside)  # only the outline is drawn
    assert np.abs(written[oy + 5, ox + 5] - GREY).max() <= 2  # outside every box


def test_panoptic_saliency_and_grid_panels(cache):
    view = read_view(cache, "flat")
    panels = {p.title.split(":")[0].split(" (")[0]: p for p in all_panels(view)}
    panoptic = panels["panoptic"].rgb.astype(int)
    sx, sy = panels["panoptic"].scale
    for x, category in ((40, PERSON), (120, SKY)):
        expected = 0.4 * GREY + 0.6 * category_palette()[category]
        assert np.abs(panoptic[round(60 * sy), round(x * sx)] - expected).max() <= 4
    assert len(view.panoptic.segments) == 2 and set(view.panoptic.segments["category"]) == {PERSON, SKY}
    saliency = panels["saliency"].rgb.astype(int)
    left, right = saliency[round(60 * sy), round(30 * sx)], saliency[round(60 * sy), round(130 * sx)]
    assert np.abs(left - right).sum() > 100  # the salient half looks different
    grid = panels["grid feature norm"].rgb.astype(int)
    assert np.abs(grid[round(10 * sy), round(10 * sx)] - grid[round(100 * sy), round(130 * sx)]).sum() > 60


def test_region_labels_from_names_or_numbers(cache):
    regions = read_view(cache, "flat").regions
    assert regions.label(0) == "wooden window 0.90" and regions.label(1) == "lamp 0.50"  # no attribute when its score is 0
    regions.object_names = regions.attribute_names = None
    assert regions.label(0) == "attr 1 class 3 0.90"


def test_failed_stages_and_images_are_said_not_drawn(cache, tmp_path):
    copy = Cache(shutil.copytree(cache.root, tmp_path / "cache"))
    table = pd.read_parquet(copy.table_path("regions", 0))
    atomic_write_parquet(copy.table_path("regions", 0), table.assign(status=["error", "ok"], error=["detector ran out of memory", ""]))
    view = read_view(copy, "flat")
    assert view.regions is None and view.failed == {"regions": "detector ran out of memory"}
    assert "regions failed: detector ran out of memory" in all_panels(view)[0].title
    images = copy.images()
    atomic_write_parquet(copy.root / "images.parquet", images.assign(status=["ok", "error"], error=["", "truncated file"]))
    result = CliRunner().invoke(main, ["show", str(copy.root), "photos/cat", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "truncated file" in result.output and not (tmp_path / "x.png").exists()


def test_padded_grid_cells_cover_the_image_as_the_grid_stage_placed_it():
    from shnet.show.view import GridNorm

    # grid.resize=pad, input 128 at stride 32 (4x4 cells): a 200x150 image is resized to 128x96,
    # top-left, so 4x3 cells are valid, each 32 input pixels = 50 image pixels
    assert GridNorm(np.ones((3, 4)), columns=4, resize="pad", input_size=128).extent(200, 150) == (200.0, 150.0)
    assert GridNorm(np.ones((2, 4)), columns=4, resize="pad", input_size=128).extent(200, 90) == (200.0, 100.0)
    assert GridNorm(np.ones((4, 4)), columns=4, resize="stretch", input_size=128).extent(200, 90) == (200.0, 90.0)


def test_token_shares_follow_the_ranks():
    from shnet.trainer.gpo import GPO

    gpool = GPO()
    tokens = torch.randn(1, 6, 5)
    tokens[0, 2] = 10.0  # token 2 is first in every dimension
    shares = token_shares(gpool, tokens, 6)
    weights = gpool.pool_weights(torch.tensor([6]))[0, :, 0]
    assert torch.isclose(shares.sum(), torch.tensor(1.0)) and torch.isclose(shares[2], weights[0])


def test_run_adds_pooling_weights(cache, tmp_path):
    from shnet.trainer.checkpoint import save_checkpoint
    from shnet.trainer.model import ModelConfig, build_model
    from shnet.trainer.text_encoders import VocabularyTokenizer

    tokenizer = VocabularyTokenizer.build(["a cat on a sofa"])
    config = ModelConfig(embed_size=32, region_dim=16, vocab_size=tokenizer.vocab_size, word_dim=8)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "best.pth", build_model(config).eval(), config, tokenizer, {"epoch": 0})
    weights = region_pooling_weights(tmp_path / "run", cache.root, "photos/cat")
    assert weights.shape == (3,) and (weights > 0).all() and weights.sum() < 1
    out = tmp_path / "cat.png"
    result = CliRunner().invoke(main, ["show", str(cache.root), "photos/cat", "--run", str(tmp_path / "run"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    panels = all_panels(read_view(cache, "photos/cat"), pooling=weights)
    assert [p.title.split(" ")[0] for p in panels][1:3] == ["regions:", "GPO"]
    assert (np.asarray(Image.open(out).convert("RGB")) == np.asarray(compose(panels)[0])).all()


def test_contact_sheet_is_a_static_page(cache, tmp_path):
    page = tmp_path / "sheet.html"
    result = CliRunner().invoke(main, ["show", str(cache.root), "--sample", "24", "-o", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 2 and "default-src 'none'" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from the network
    links = re.findall(r'href="([^"]+)"', html)
    assert len(links) == 2 and all((tmp_path / link).is_file() for link in links)
    assert Image.open(tmp_path / links[0]).width > 600


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (/usr/bin/chromium)")
def test_contact_sheet_renders_in_headless_chromium(cache, tmp_path):
    page = tmp_path / "sheet.html"
    CliRunner().invoke(main, ["show", str(cache.root), "--sample", "2", "-o", str(page)])
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}", "--window-size=900,700", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    cards = pixels[120:500, :600]
    assert cards.std() > 20  # the thumbnails are drawn, not an empty page
    assert (np.abs(cards - category_palette()[PERSON] * 0.45 - GREY * 0.55).sum(axis=-1) < 30).any()  # the panoptic tint of the flat image


@pytest.mark.slow
def test_show_on_a_really_extracted_cache(tmp_path):
    """Every stage extracted by `shnet extract` (profile demo: random-init detector and grid,
    ground-truth panoptic) from generated scenes, then drawn: boxes where the regions stage put them."""
    from shnet.demo.dataset import DatasetSettings, generate_dataset
    from shnet.pipeline.runner import ExtractRequest, run_extract

    files = generate_dataset(tmp_path / "data", DatasetSettings(images=4, seed=1))
    request = ExtractRequest(
        image_dirs=[str(files.images)], cache=str(tmp_path / "cache"), profile="demo",
        overrides=[f"panoptic.annotations={files.panoptic_json}"], workers=1, shard_size=4,
    )
    assert run_extract(request).failed_images == 0
    cache = Cache(tmp_path / "cache")
    image_id = cache.images()["image_id"].iloc[0]
    out = tmp_path / "panels.png"
    result = CliRunner().invoke(main, ["show", str(cache.root), image_id, "-o", str(out)])
    assert result.exit_code == 0, result.output
    view = read_view(cache, image_id)
    assert view.stages == ["grid", "panoptic", "regions", "saliency"] and not view.image_note
    assert len(view.regions.boxes) == int(cache.read("regions", "num_boxes", image_id)) > 0
    panels = all_panels(view)
    written = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (written == np.asarray(compose(panels)[0])).all()
    outlines = regions_panel(view, labels=False)  # labels are drawn above every outline and may cover one
    sx, sy = outlines.scale
    x1, y1, x2, y2 = view.regions.boxes[-1]  # drawn last: no other outline covers it
    colour = _hex(BOX_COLOURS[(len(view.regions.boxes) - 1) % len(BOX_COLOURS)])
    middle_y = round((y1 + y2) / 2 * sy)
    edge = outlines.rgb[middle_y, round(x2 * sx) - 1 : round(x2 * sx) + 2]
    assert np.abs(edge - colour).sum(axis=1).min() < 60
    assert set(view.panoptic.segments["category"]) <= set(np.unique(view.panoptic.class_map)) and len(view.panoptic.segments) >= 2
    sheet = tmp_path / "sheet.html"
    assert CliRunner().invoke(main, ["show", str(cache.root), "--sample", "3", "-o", str(sheet)]).exit_code == 0
    assert sheet.read_text().count("data:image/jpeg;base64,") == 3
