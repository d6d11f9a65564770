"""`shnet extract` end to end: real photos and bad files, real Dask worker processes, real shards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from shnet.fileio import file_sha256
from shnet.cli import main
from shnet.cache import Cache, CacheLock

SMOKE = ["--profile", "smoke", "--set", "grid.input_size=64", "--set", "saliency.resolution=32"]
SHNET = [sys.executable, "-m", "shnet"]


def extract(*args):
    return CliRunner().invoke(main, ["extract", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def mixed_cache(mixed_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("caches") / "mixed"
    result = extract(mixed_dir, "-o", cache, *SMOKE, "--workers", 2, "--shard-size", 4, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    return cache, result.output


def test_extract_writes_every_stage_and_reports_bad_images(mixed_cache):
    cache, output = mixed_cache
    images = pd.read_parquet(cache / "images.parquet")
    assert len(images) == 10 and images["image_id"].is_unique
    failed = images[images["status"] == "error"].set_index("image_id")
    assert sorted(failed.index) == ["bad/empty", "bad/not-an-image", "bad/truncated"]
    assert all(failed["error"].str.len() > 0)
    ok = images[images["status"] == "ok"]
    assert (ok["width"] > 0).all() and (ok["height"] > 0).all()
    assert "3 could not be decoded" in output
    for stage in ("probe", "grid", "saliency"):
        table = pd.read_parquet(cache / stage / "table")
        assert len(table) == 10 and table["image_id"].is_unique
        assert set(table.loc[table["status"] == "error", "image_id"]) == set(failed.index)
    store = Cache(cache)
    assert store.num_shards == 3
    with store.open_arrays("grid", 0) as h5:
        assert h5["grid"].shape == (4, 2, 2, 2048) and h5["grid"].dtype == np.float16
        assert json.loads(h5.attrs["config"])["model"] == "resnet50"
        assert h5.attrs["weights_sha256"] == "random-init"
        assert "torch" in json.loads(h5.attrs["versions"])
    saliency = store.read("saliency", "saliency", "animals/chelsea")
    assert saliency.shape == (32, 32) and 0 <= saliency.min() and saliency.max() <= 1 and saliency.max() > 0.5
    assert not np.any(store.read("grid", "grid", "bad/empty"))


def test_grid_features_equal_the_bare_model(mixed_cache, mixed_dir):
    import torch

    from shnet.pipeline.images import decode_image
    from shnet.pipeline.models.grid import build_grid_backbone, preprocess

    cache, _ = mixed_cache
    model = build_grid_backbone("resnet50", "random")
    x, valid = preprocess(decode_image(mixed_dir / "places/china.jpg", draft_size=64), 64, "stretch", model.mean, model.std, model.stride)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)[None])[0].permute(1, 2, 0).numpy().astype(np.float16)
    stored = Cache(cache).read("grid", "grid", "places/china")
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert tuple(Cache(cache).read("grid", "valid_hw", "places/china")) == valid


def test_each_worker_builds_each_model_once(mixed_cache):
    cache, _ = mixed_cache
    store = Cache(cache)
    markers = [store.done_marker("grid", s) for s in range(store.num_shards)]
    assert sum(m["model_built"] for m in markers) <= len({m["pid"] for m in markers}) <= 2


def _snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_rerun_of_a_finished_cache_does_nothing(mixed_cache, mixed_dir):
    cache, _ = mixed_cache
    before = _snapshot(cache)
    assert cache / "images.parquet" in before and cache / "cache.json" in before
    result = extract(mixed_dir, "-o", cache, *SMOKE)
    assert result.exit_code == 0
    assert "nothing to do" in result.output
    assert _snapshot(cache) == before, "a finished cache re-run must not touch a single file"


def test_rerun_with_another_config_is_refused(mixed_cache, mixed_dir):
    cache, _ = mixed_cache
    record = (cache / "cache.json").read_text()
    result = CliRunner().invoke(main, ["extract", str(mixed_dir), "-o", str(cache), "--profile", "smoke", "--set", "saliency.resolution=32"])
    assert result.exit_code == 1
    assert "grid.input_size: cache has 64, this run asks for 128" in result.output
    assert (cache / "cache.json").read_text() == record


def test_changed_image_folder_or_shard_size_is_refused(mixed_cache, photo_dir, mixed_dir):
    cache, _ = mixed_cache
    result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(cache), *SMOKE])
    assert result.exit_code == 1 and "image folders changed" in result.output
    result = CliRunner().invoke(main, ["extract", str(mixed_dir), "-o", str(cache), *SMOKE, "--shard-size", "5"])
    assert result.exit_code == 1 and "--shard-size 4" in result.output


def test_second_writer_is_refused_by_the_lock(photo_dir, tmp_path):
    cache = tmp_path / "locked"
    with CacheLock(cache):
        result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(cache), *SMOKE])
    assert result.exit_code == 1
    assert "being written by another `shnet extract`" in result.output
    assert not (cache / "cache.json").exists()


def test_bad_inputs_get_one_clear_message(tmp_path, photo_dir):
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(tmp_path / "nope"), "-o", str(tmp_path / "c")])
    assert result.exit_code != 0 and "nope" in result.output
    result = runner.invoke(main, ["extract", str(photo_dir), "-o", str(tmp_path / "c"), "--stages", "grid"])
    assert result.exit_code == 1 and "grid.weights" in result.output
    result = runner.invoke(main, ["extract", str(photo_dir), "-o", str(tmp_path / "c"), *SMOKE, "--set", "grid.colour=red"])
    assert result.exit_code == 1 and "grid.colour" in result.output
    result = runner.invoke(main, ["extract", str(photo_dir), "-o", str(tmp_path / "c"), *SMOKE, "--stages", "regionz"])
    assert result.exit_code == 1 and "unknown stage 'regionz'" in result.output


def test_inspect_and_verify(mixed_cache):
    cache, _ = mixed_cache
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(cache), "--json"])
    info = json.loads(result.output)
    grid = next(s for s in info["stages"] if s["name"] == "grid")
    assert grid["shards_done"] == 3 and grid["images_ok"] == 7 and grid["images_error"] == 3
    assert grid["arrays"]["grid"] == {"shape": [2, 2, 2048], "dtype": "float16"}
    one = json.loads(runner.invoke(main, ["inspect", str(cache), "--image", "things/coffee"]).output)
    assert one["status"] == "ok" and one["stages"]["saliency"]["saliency"]["shape"] == [32, 32]
    assert "bad/truncated" in runner.invoke(main, ["inspect", str(cache), "--errors"]).output
    result = runner.invoke(main, ["verify", str(cache)])
    assert result.exit_code == 0, result.output


def test_verify_finds_a_damaged_shard(mixed_cache, tmp_path):
    import shutil

    cache, _ = mixed_cache
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    with h5py.File(copy / "grid" / "00001.h5", "a") as h5:
        h5["grid"][1] = np.nan  # row 1 of shard 1: gray/camera, an ok image
    table = pd.read_parquet(copy / "saliency" / "table" / "00000.parquet")
    table.iloc[:-1].to_parquet(copy / "saliency" / "table" / "00000.parquet")
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "grid shard 1: array 'grid' holds NaN/inf" in result.output
    assert "saliency shard 0: 3 table rows" in result.output


def _read_all(cache: Path) -> dict:
    out = {}
    for path in sorted(cache.rglob("*.h5")):
        with h5py.File(path) as h5:
            for key in h5:
                out[f"{path.relative_to(cache)}/{key}"] = h5[key][()]
    return out


def test_killed_run_resumes_to_an_identical_complete_cache(photo_dir, tmp_path):
    args = [str(photo_dir), *SMOKE, "--workers", "1", "--shard-size", "1", "--stages", "grid"]
    reference = tmp_path / "reference"
    assert extract(*args[:1], "-o", reference, *args[1:]).exit_code == 0

    cache = tmp_path / "killed"
    proc = subprocess.Popen([*SHNET, "extract", *args[:1], "-o", str(cache), *args[1:]], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((cache / "grid").glob("*.done"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((cache / "grid").glob("*.done")))
    assert 2 <= done_before < 7, "the run was not killed mid-way"

    result = extract(*args[:1], "-o", cache, *args[1:])
    assert result.exit_code == 0, result.output
    assert not list(cache.rglob("*.tmp-*"))
    table = pd.read_parquet(cache / "grid" / "table")
    assert len(table) == 7 and table["image_id"].is_unique
    got, want = _read_all(cache), _read_all(reference)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0


def test_a_worker_killed_mid_shard_costs_a_retry_not_the_run(photo_dir, tmp_path):
    cache = tmp_path / "worker-loss"
    proc = subprocess.Popen([*SHNET, "extract", str(photo_dir), "-o", str(cache), *SMOKE, "--workers", "2",
                             "--shard-size", "1", "--stages", "grid"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((cache / "grid").glob("*.done")):
        time.sleep(0.02)
    victim = json.loads(next((cache / "grid").glob("*.done")).read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    store = Cache(cache)
    assert store.is_stage_complete("grid")
    table = pd.read_parquet(cache / "grid" / "table")
    assert len(table) == 7 and table["image_id"].is_unique
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_extract_on_an_existing_dask_cluster(photo_dir, tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([str(bindir / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from dask.distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        cache = tmp_path / "remote"
        result = extract(photo_dir, "-o", cache, *SMOKE, "--scheduler", address, "--shard-size", 2)
        assert result.exit_code == 0, result.output
        store = Cache(cache)
        assert store.is_stage_complete("grid") and store.is_stage_complete("saliency")
        import psutil

        pids = {store.done_marker(stage, s)["pid"] for stage in ("grid", "saliency") for s in range(store.num_shards)}
        worker_pids = {c.pid for p in procs[1:] for c in psutil.Process(p.pid).children(recursive=True)} | {p.pid for p in procs[1:]}
        assert pids <= worker_pids and len(pids) == 2, "both external workers did the work"
        assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_learned_saliency_backend_with_local_weights(tmp_path):
    import torch
    from PIL import Image

    from shnet.pipeline.models.msinet import MSINet

    folder = tmp_path / "two"
    folder.mkdir()
    import skimage.data

    for name, pixels in (("coffee", skimage.data.coffee()), ("rocket", skimage.data.rocket())):
        image = Image.fromarray(pixels)
        image.thumbnail((120, 120))
        image.save(folder / f"{name}.jpg")
    torch.manual_seed(0)
    weights = tmp_path / "msinet.pth"
    torch.save(MSINet().state_dict(), weights)
    cache = tmp_path / "sal"
    result = extract(folder, "-o", cache, "--profile", "smoke", "--stages", "saliency", "--workers", 1,
                     "--set", "saliency.backend=msinet", "--set", f"saliency.weights={weights}", "--set", "saliency.resolution=24")
    assert result.exit_code == 0, result.output
    store = Cache(cache)
    maps = [store.read("saliency", "saliency", i).astype(np.float32) for i in ("coffee", "rocket")]
    assert all(m.shape == (24, 24) and 0 <= m.min() and m.max() <= 1 and m.std() > 0 for m in maps)
    assert store.stage_config("saliency")["weights_sha256"] == file_sha256(weights)


def test_a_bad_weights_file_is_refused_in_seconds_before_any_cluster_starts(photo_dir, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    cases = {
        junk: "not a checkpoint",
        tmp_path / "missing.pth": "weights not found",
    }
    import torch

    wrong = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, wrong)
    cases[wrong] = "does not match grid model resnet50"
    for weights, expected in cases.items():
        cache = tmp_path / f"cache-{weights.stem}"
        started = time.perf_counter()
        result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(cache), *SMOKE, "--set", f"grid.weights={weights}"])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert str(weights) in result.output and "weights_only" not in result.output
        assert time.perf_counter() - started < 20
        assert not cache.exists(), "nothing may be created before the config is known to be good"


def test_counts_below_one_are_refused(photo_dir, tmp_path):
    for flag in ("--workers", "--shard-size", "--batch-size", "--threads-per-worker"):
        for value in ("0", "-2"):
            result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(tmp_path / "c"), *SMOKE, flag, value])
            assert result.exit_code == 2 and flag in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_a_failing_shard_is_one_line_and_its_traceback_goes_to_the_log(photo_dir, tmp_path):
    cache = tmp_path / "failing"
    first = extract(photo_dir, "-o", cache, *SMOKE, "--workers", 1, "--shard-size", 3, "--stages", "saliency")
    assert first.exit_code == 0, first.output
    (cache / "grid" / "00001.h5").mkdir(parents=True)  # the commit's rename onto it fails, for real
    proc = subprocess.run([*SHNET, "extract", str(photo_dir), "-o", str(cache), *SMOKE, "--workers", "1", "--stages", "grid"],
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "1 shard(s) failed" in output and "grid shard 1: IsADirectoryError" in output, output
    assert "Traceback" not in output and "Compute Failed" not in output, output
    log = Cache.error_log_path(cache)
    assert str(log) in output
    text = log.read_text()
    assert text.count("stage grid shard 1 attempt") == 3 and "Traceback (most recent call last)" in text
    store = Cache(cache)
    assert store.done_shards("grid") == [0, 2] and not list(cache.rglob("*.tmp-*"))
