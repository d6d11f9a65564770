"""A damaged cache or a malformed input file: one message naming the file (exit 1), never a
traceback or a silent wrong answer. Copies of one small real cache are damaged one file at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from shnet.cache import Cache, write_stage
from shnet.npy_sets.exporter import ExportRequest, export_split
from shnet.fileio import atomic_write_parquet
from shnet.cli import main
from shnet.errors import ShnetError
from shnet.fileio import terminal_safe
from shnet.pipeline.images import discover_images
from shnet.cache.captions import read_captions
from shnet.trainer.synthetic import write_concept_cache

SMOKE = ["--profile", "smoke"]


def shnet(*args) -> "click.testing.Result":  # noqa: F821 - the Result of CliRunner.invoke
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *names: str) -> str:
    """The run ended with one message (exit 1, no traceback) naming every one of ``names``."""
    output = result.output
    assert result.exit_code == 1, output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in output, (repr(result.exception), output)
    for name in names:
        assert name in output, (name, output)
    return output


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, extract) -> Path:
    """The bundled sample images, smoke profile: stages probe, grid, saliency in 3 shards of 2."""
    cache = tmp_path_factory.mktemp("damaged") / "cache"
    extract("--sample", "-o", cache, *SMOKE, "--shard-size", 2)
    return cache


@pytest.fixture
def copy(extracted, tmp_path) -> Path:
    return Path(shutil.copytree(extracted, tmp_path / "copy"))


def truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_done_markers_vouch_for_sizes_and_hashes(extracted):
    marker = json.loads((extracted / "grid" / "00001.done").read_text())
    assert set(marker["files"]) == {"00001.h5", "table/00001.parquet"}
    for name, vouched in marker["files"].items():
        assert vouched["bytes"] == (extracted / "grid" / name).stat().st_size and len(vouched["sha256"]) == 64
    assert shnet("verify", extracted).exit_code == 0


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda c: truncate(c / "grid" / "00001.h5"), "00001.h5 has 1000 bytes"),
        (lambda c: (c / "grid" / "00001.h5").write_bytes(os.urandom((c / "grid" / "00001.h5").stat().st_size)), "00001.h5 is not a .h5 file"),
        (lambda c: truncate(c / "grid" / "table" / "00001.parquet", 500), "table/00001.parquet has 500 bytes"),
        (lambda c: (c / "grid" / "00001.h5").unlink(), "00001.h5 is missing"),
        (lambda c: (c / "grid" / "00001.done").write_text('{"stage": "gr'), "its done marker is unreadable"),
    ],
    ids=["truncated-h5", "garbage-h5", "truncated-table", "deleted-h5", "cut-marker"],
)
def test_a_damaged_shard_is_named_by_verify_inspect_extract_and_train(copy, damage, expected, extract):
    damage(copy)
    refused(shnet("verify", copy), f"grid shard 1: {expected}", str(copy / "grid" / "00001.done"))
    refused(shnet("verify", copy, "--quick"), f"grid shard 1: {expected}")
    inspected = shnet("inspect", copy)
    assert inspected.exit_code == 0 and "2/3 (1 unreadable)" in inspected.output and "unreadable: grid shard 1" in inspected.output
    assert "Traceback" not in inspected.output
    output = refused(extract("--sample", "-o", copy, *SMOKE, "--refuse-damaged", ok=False), "grid shard 1", expected)
    assert "nothing to do" not in output and (copy / "grid" / "00001.done").exists()


def test_rewritten_values_are_found_by_the_hash_not_by_quick(copy):
    path = copy / "saliency" / "00000.h5"
    data = bytearray(path.read_bytes())
    data[-100:] = bytes(100)  # same size, same signature, other content
    path.write_bytes(bytes(data))
    refused(shnet("verify", copy), "saliency shard 0: 00000.h5 content differs", "sha256")
    assert shnet("verify", copy, "--quick").exit_code == 0


def test_extract_redoes_damaged_shards_and_keeps_the_good_ones(copy, extract):
    truncate(copy / "grid" / "00001.h5")
    (copy / "saliency" / "00002.h5").unlink()
    truncate(copy / "grid" / "table" / "00002.parquet", 500)
    good = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file() and "00000" in p.name}
    result = extract("--sample", "-o", copy, *SMOKE, ok=False)
    assert result.exit_code == 0, result.output
    assert "grid shard 1 was damaged" in result.output and "saliency shard 2 was damaged" in result.output
    assert "grid shard 2 was damaged" in result.output
    assert {p: p.stat().st_mtime_ns for p in good} == good
    assert shnet("verify", copy).exit_code == 0
    assert "nothing to do" in extract("--sample", "-o", copy, *SMOKE, ok=False).output


def test_old_markers_without_sizes_are_checked_for_presence_only(copy, extract):
    for done in copy.glob("*/*.done"):
        marker = json.loads(done.read_text())
        del marker["files"]
        done.write_text(json.dumps(marker))
    result = shnet("verify", copy)
    assert result.exit_code == 0 and "9 shard(s) have done markers of an older shnet" in result.output
    assert "nothing to do" in extract("--sample", "-o", copy, *SMOKE, ok=False).output
    (copy / "grid" / "00002.h5").unlink()
    refused(extract("--sample", "-o", copy, *SMOKE, "--refuse-damaged", ok=False), "grid shard 2: 00002.h5 is missing")


@pytest.mark.parametrize("name", ["cache.json", "images.parquet"])
def test_a_damaged_record_or_image_table_is_named_in_every_command(copy, name, tmp_path):
    truncate(copy / name, 40)
    for args in (["verify", copy], ["inspect", copy], ["inspect", copy, "--errors"], ["show", copy, "--sample", 2, "-o", tmp_path / "s.html"],
                 ["extract", "--sample", "-o", copy, *SMOKE]):
        refused(shnet(*args), str(copy / name), "restore it from a backup")


def test_no_traceback_reaches_the_terminal_of_a_real_process(copy):
    truncate(copy / "cache.json", 40)
    for command in ("verify", "inspect"):
        run = subprocess.run([sys.executable, "-m", "shnet", command, str(copy)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout, run.stderr
        assert run.stderr.count("\n") == 1 and str(copy / "cache.json") in run.stderr


def test_a_missing_or_cut_h5_is_named_by_show_and_inspect_image(copy, tmp_path):
    image_id = Cache(copy).images().query("shard == 1")["image_id"].iloc[0]
    truncate(copy / "grid" / "00001.h5")
    refused(shnet("show", copy, image_id, "-o", tmp_path / "p.png"), str(copy / "grid" / "00001.h5"))
    (copy / "saliency" / "00001.h5").unlink()
    refused(shnet("inspect", copy, "--image", image_id), "00001.h5")


def test_control_characters_never_reach_the_terminal(copy):
    images = Cache(copy).images()
    images.loc[0, ["status", "error", "image_id"]] = ["error", "bad \x1b[2J", "evil\x1b]0;title\x07"]
    atomic_write_parquet(copy / "images.parquet", images)
    output = shnet("inspect", copy, "--errors").output
    assert "\x1b" not in output and "\x07" not in output and "evil\\x1b]0;title\\x07" in output
    assert terminal_safe("a\nb\x9b") == "a\\nb\\x9b" and terminal_safe("a\nb\x1b", keep_newlines=True) == "a\nb\\x1b"


def test_an_output_under_a_file_is_refused_before_any_work(extracted, tmp_path, extract):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(extract("--sample", "-o", blocker / "sub", *SMOKE, ok=False), f"{blocker} is a file")
    refused(shnet("show", extracted, "--sample", 2, "-o", blocker / "x.html"), f"{blocker} is a file")
    assert blocker.read_text() == "x"


def test_image_folders_with_odd_links_and_names(tmp_path, extract):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(next(Path(__file__).parent.parent.joinpath("shnet/data/samples").glob("*.jpg")), folder / "real.jpg")
    os.symlink("self.jpg", folder / "self.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    os.symlink("loop", folder / "loop")
    found = discover_images([folder]).set_index("image_id")
    assert sorted(found.index) == ["dangling", "real", "self"]
    assert found.loc["dangling", "bytes"] == -1 and found.loc["self", "bytes"] == -1
    shutil.copy(folder / "real.jpg", folder / "two\nlines.jpg")
    refused(extract(folder, "-o", tmp_path / "c", *SMOKE, ok=False), "two\\nlines", "control character")
    assert not (tmp_path / "c").exists()


def test_weights_that_are_not_weights(extracted, tmp_path, extract):
    text = tmp_path / "grid.pth"
    text.write_text("these are not weights\n")
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    for weights, message in ((text, "not a checkpoint"), ("/dev/zero", "not a regular file"), (fifo, "not a regular file")):
        refused(extract("--sample", "-o", tmp_path / "c", *SMOKE, "--set", f"grid.weights={weights}", ok=False), str(weights), message)
    refused(shnet("evaluate", text, "--cache", extracted), str(text), "not a checkpoint")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02" + bytes(range(200)))
    refused(shnet("evaluate", junk, "--cache", extracted), str(junk), "damaged pickle")
    short = tmp_path / "short.pth"
    short.write_bytes(b"junk")  # too short for torch's legacy header: struct.error inside torch.load
    refused(shnet("evaluate", short, "--cache", extracted), str(short), "not a checkpoint")
    refused(shnet("evaluate", fifo, "--cache", extracted), str(fifo), "not a regular file")


def test_an_unknown_grid_model_is_refused_before_any_work_whatever_the_weights(tmp_path, extract):
    for weights in ("random", tmp_path / "absent.pth"):
        output = refused(extract("--sample", "-o", tmp_path / "c", *SMOKE, "--set", "grid.model=resnet5O", "--set", f"grid.weights={weights}", ok=False), "resnet5O", "resnet50", "timm:<name>")
        assert "absent.pth" not in output  # the name is checked first
    assert not (tmp_path / "c").exists()


# --- caption files, import / export, train ---------------------------------------------------------


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("concept")
    captions = write_concept_cache(root / "cache", {"train": 8, "test": 4}, feature_dim=16, num_boxes=4, shard_size=4)
    captions.to_csv(root / "captions.csv", index=False)
    return root


BAD_CAPTIONS = {
    "latin1.csv": (b"image_id,caption,split\nimg00000,caf\xe9 au lait,test\n", "not UTF-8"),
    "empty.csv": (b"", "No columns to parse"),
    "quote.csv": (b'image_id,caption,split\nimg00000,"never closed,test\n', "EOF inside string"),
    "strings.json": (json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": "a cat"}]}).encode(), "image #0"),
    "newline.csv": (b'image_id,caption,split\n"img\n00000",a cat,test\n', "control character"),
}


@pytest.mark.parametrize("name", sorted(BAD_CAPTIONS))
def test_a_malformed_caption_file_is_one_message_in_export_train_and_encode(concept, tmp_path, name):
    data, reason = BAD_CAPTIONS[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ShnetError, match=reason):
        read_captions(path)
    refused(shnet("export", concept / "cache", "-o", tmp_path / "out", "--split", "test", "--captions", path), str(path))
    refused(shnet("train", "--cache", concept / "cache", "--captions", path, "-o", tmp_path / "run", "--epochs", 1), str(path))
    assert not (tmp_path / "out").exists()


def test_train_names_a_damaged_shard_before_training(concept, tmp_path):
    cache = Path(shutil.copytree(concept / "cache", tmp_path / "cache"))
    truncate(cache / "regions" / "00001.h5")
    result = shnet("train", "--cache", cache, "--captions", concept / "captions.csv", "-o", tmp_path / "run", "--epochs", 1, "--val-split", "test")
    refused(result, "stage 'regions' shard 1: 00001.h5 has 1000 bytes", str(cache / "regions" / "00001.done"))
    assert not (tmp_path / "run").exists()


def test_export_refuses_an_image_id_that_would_break_the_ids_file(tmp_path):
    """A cache written before ids were checked: export still never writes a broken ids file."""
    ids = ["a", "b\nc", "d", "e"]
    write_stage(tmp_path / "cache", "layout", ids, {"cat_onehot": np.zeros((4, 133), np.uint8)}, {"synthetic": True})
    with pytest.raises(ShnetError, match=r"line 2: the name 'b\\nc' holds a control character"):
        export_split(Cache(tmp_path / "cache"), ExportRequest("test", ids, None), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", ["../../x", "/abs/path", "a\nb"])
def test_export_split_names_stay_inside_the_output(concept, tmp_path, split):
    captions = pd.read_csv(concept / "captions.csv").replace({"split": {"test": split}})
    captions.to_csv(tmp_path / "caps.csv", index=False)
    out = tmp_path / "deep" / "er" / "out"
    result = shnet("export", concept / "cache", "-o", out, "--split", split, "--captions", tmp_path / "caps.csv")
    refused(result, "--split" if "\n" not in split else "control character")
    assert not list(tmp_path.rglob("*.npy"))


def _npy_set(folder: Path, features: np.ndarray, ids: list[str]) -> Path:
    folder.mkdir()
    np.save(folder / "test_ims.npy", features)
    (folder / "test_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    return folder


def test_import_refuses_nonfinite_features_unless_allowed_and_empty_ids(tmp_path):
    features = np.ones((3, 2, 4), np.float32)
    features[1, 0, 2] = np.nan
    source = _npy_set(tmp_path / "nan", features, ["a", "b", "c"])
    refused(shnet("import", source, "-o", tmp_path / "c1"), str(source / "test_ims.npy"), "image 'b'", "--allow-nonfinite")
    assert not (tmp_path / "c1").exists()
    assert shnet("import", source, "-o", tmp_path / "c2", "--allow-nonfinite").exit_code == 0
    source = _npy_set(tmp_path / "empty", np.ones((3, 2, 4), np.float32), ["a", "", "c"])
    refused(shnet("import", source, "-o", tmp_path / "c3"), str(source / "test_ids.txt"), "line 2 is an empty image id")


# --- embedding stores --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(concept, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    result = shnet("train", "--cache", concept / "cache", "--captions", concept / "captions.csv", "-o", root / "run", "--epochs", 1,
                   "--embed-size", 16, "--word-dim", 16, "--batch-size", 4, "--workers", 0, "--val-split", "test", "--no-progress")
    assert result.exit_code == 0, result.output
    result = shnet("encode", root / "run", "--cache", concept / "cache", "-o", root / "emb", "--shard-size", 4, "--captions", concept / "captions.csv")
    assert result.exit_code == 0, result.output
    return root


def test_a_damaged_embedding_store_is_named_by_search_and_redone_by_encode(store, concept, tmp_path):
    emb = Path(shutil.copytree(store / "emb", tmp_path / "emb"))
    truncate(emb / "images" / "00001.parquet", 300)
    refused(shnet("search", emb, "a query"), "1 of 3 images shard(s) are missing", "re-run the same `shnet encode`")
    result = shnet("encode", store / "run", "--cache", concept / "cache", "-o", emb, "--shard-size", 4, "--captions", concept / "captions.csv")
    assert result.exit_code == 0, result.output
    searched = shnet("search", emb, "a \x1b[2J query")
    assert searched.exit_code == 0 and "\x1b" not in searched.output and "a \\x1b[2J query" in searched.output
    truncate(emb / "embeddings.json", 30)
    refused(shnet("search", emb, "a query"), str(emb / "embeddings.json"))


def test_a_failed_encode_leaves_no_folder_and_search_html_under_a_file_is_refused_first(store, concept, tmp_path):
    bad = tmp_path / "empty.csv"
    bad.write_bytes(b"")
    refused(shnet("encode", store / "run", "--cache", concept / "cache", "-o", tmp_path / "emb", "--captions", bad), str(bad))
    assert not (tmp_path / "emb").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(shnet("search", store / "emb", "a query", "--html", blocker / "x.html"), f"{blocker} is a file")
