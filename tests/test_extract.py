"""`shnet extract` end to end: real photos and bad files, real shards. The tests of the cache's content
run the tasks in-process (conftest's ``extract``); those of Dask itself use real worker processes: a
killed run resumed, a lost worker, an external scheduler, results equal whatever runs the tasks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from shnet.fileio import file_sha256
from shnet.cli import main
from shnet.cache import Cache, CacheLock
from shnet.pipeline.executors import available_cores
from shnet.pipeline.faults import BUILT, FAIL, HOLD

SMOKE = ["--profile", "smoke", "--set", "grid.input_size=64", "--set", "saliency.resolution=32"]
MIXED = [*SMOKE, "--shard-size", 4, "--batch-size", 3]
SHNET = [sys.executable, "-m", "shnet"]


# On a CPU a convolution's float rounding depends on its thread count: the in-process runs that
# cluster runs are compared with use as many torch threads as a worker that has the machine alone.
WORKER_THREADS = available_cores()


@pytest.fixture(scope="module")
def mixed_cache(mixed_dir, tmp_path_factory, extract):
    cache = tmp_path_factory.mktemp("caches") / "mixed"
    result = extract(mixed_dir, "-o", cache, *MIXED, torch_threads=WORKER_THREADS)
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


def test_in_process_tasks_run_here_and_build_each_model_once(mixed_cache):
    cache, _ = mixed_cache
    store = Cache(cache)
    markers = [store.done_marker("grid", s) for s in range(store.num_shards)]
    assert {m["pid"] for m in markers} == {os.getpid()}
    assert [m["model_built"] for m in markers].count(True) == 1


def _tables(cache: Path) -> dict:
    """Every stage table and images.parquet, without the timings."""
    out = {"images": pd.read_parquet(cache / "images.parquet")}
    for path in sorted(cache.glob("*/table/*.parquet")):
        out[str(path.relative_to(cache))] = pd.read_parquet(path).drop(columns=["seconds"], errors="ignore")
    return out


def assert_same_cache(got: Path, want: Path) -> None:
    """Every array, every stage table and images.parquet equal (timings aside)."""
    arrays, expected = _read_all(got), _read_all(want)
    assert arrays.keys() == expected.keys() and len(expected) > 3
    for key in expected:
        np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)
    tables, expected = _tables(got), _tables(want)
    assert tables.keys() == expected.keys()
    for key in expected:
        pd.testing.assert_frame_equal(tables[key], expected[key], obj=key)


def _snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_rerun_of_a_finished_cache_does_nothing(mixed_cache, mixed_dir, extract):
    cache, _ = mixed_cache
    before = _snapshot(cache)
    assert cache / "images.parquet" in before and cache / "cache.json" in before
    result = extract(mixed_dir, "-o", cache, *SMOKE)
    assert "nothing to do" in result.output
    assert _snapshot(cache) == before, "a finished cache re-run must not touch a single file"


def test_a_finished_cache_starts_no_cluster(mixed_cache, mixed_dir, extract, monkeypatch):
    """Without --scheduler in-process: the cluster is started early only for a new cache."""
    from shnet.pipeline import executors

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a finished cache")

    monkeypatch.setattr(executors, "start_local_cluster", no_cluster)
    cache, _ = mixed_cache
    before = _snapshot(cache)
    result = extract(mixed_dir, "-o", cache, *SMOKE, cluster=True)
    assert "nothing to do" in result.output and _snapshot(cache) == before


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


# a worker preload that names its process, then (``WORKER_HANGS``) stays in the cluster's start for ten minutes
STARTING = "SHNET_TEST_STARTING"
WORKER_PRELOAD = f"import os, pathlib, time\npathlib.Path(os.environ['{STARTING}'], str(os.getpid())).touch()\n"
WORKER_HANGS = "time.sleep(600)\n"


@pytest.mark.parametrize("workers", ["starting", "joined"])
@pytest.mark.parametrize("stop", ["refused", "interrupted"])
def test_an_extract_stopped_before_its_first_task_stops_its_workers_at_once(photo_dir, tmp_path, monkeypatch, stop, workers):
    """The embedded cluster of a new cache starts while the run is checked. A run refused (here by the
    lock) or interrupted (Ctrl-C) while its workers start, or once they joined, neither waits for
    them nor leaves them running."""
    from shnet.pipeline import executors, runner

    starting, cache = tmp_path / "starting", tmp_path / "cache"
    starting.mkdir()
    (tmp_path / "preload.py").write_text(WORKER_PRELOAD + (WORKER_HANGS if workers == "starting" else ""))
    monkeypatch.setenv(STARTING, str(starting))
    monkeypatch.setattr(executors, "WORKER_PRELOAD", (str(tmp_path / "preload.py"),))
    clusters, start_cluster = [], executors.start_local_cluster
    monkeypatch.setattr(executors, "start_local_cluster", lambda *args, **kwargs: clusters.append(start_cluster(*args, **kwargs)) or clusters[-1])
    stopped_at = []

    def lock_once_the_workers_are(root):
        deadline = time.monotonic() + 240
        while not any(starting.iterdir()) or (workers == "joined" and len(clusters[0].scheduler_info.get("workers", {})) < len(clusters[0].worker_spec)):
            assert time.monotonic() < deadline, f"the workers were not {workers} within 240 s"
            time.sleep(0.05)
        stopped_at.append(time.monotonic())
        if stop == "interrupted":
            raise KeyboardInterrupt
        return CacheLock(root)

    monkeypatch.setattr(runner, "CacheLock", lock_once_the_workers_are)
    with CacheLock(cache):
        result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(cache), *SMOKE])
    waited = time.monotonic() - stopped_at[0]
    expected = "being written by another `shnet extract`" if stop == "refused" else "interrupted"
    assert result.exit_code == (1 if stop == "refused" else 130) and expected in result.output, result.output
    assert waited < 30, f"the run waited {waited:.0f} s for workers it never used"
    assert all(_gone(int(worker.name), 10) for worker in starting.iterdir()), "a worker was left running"
    assert not _worker_processes() and not (cache / "cache.json").exists()


def _worker_processes() -> list[int]:
    """This process's descendants started by multiprocessing's spawn (Dask workers), still running."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


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


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    """Until ``path`` exists; fails (naming the run's output when it has one) if the run ends first."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name} appeared: {output}")
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds} s"
        time.sleep(0.02)


def _gone(pid: int, seconds: float = 60) -> bool:
    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_killed_run_resumes_to_an_identical_complete_cache(mixed_cache, mixed_dir, tmp_path, extract):
    """A one-worker cluster run killed (the whole process group) while grid shard 1 is held in its
    worker; the resumed run keeps the shards done before, and the cache equals the in-process one."""
    cache, release = tmp_path / "killed", tmp_path / "release"
    proc = subprocess.Popen([*SHNET, "extract", mixed_dir, "-o", cache, *map(str, MIXED), "--workers", "1"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, HOLD: f"grid:1:{release}"})
    _wait_for(Path(f"{release}.waiting"), proc)
    holder = int(Path(f"{release}.waiting").read_text())
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and holder != proc.pid and _gone(holder), "the run and its worker were killed"
    done_before = {p: p.read_bytes() for p in cache.glob("*/*.done")}
    assert cache / "grid" / "00001.done" not in done_before and cache / "probe" / "00001.done" in done_before

    extract(mixed_dir, "-o", cache, *MIXED, torch_threads=WORKER_THREADS)
    assert all(path.read_bytes() == marker for path, marker in done_before.items()), "done shards are kept"
    assert not list(cache.rglob("*.tmp-*"))
    assert_same_cache(cache, mixed_cache[0])
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0


def test_a_worker_killed_mid_shard_costs_a_retry_not_the_run(photo_dir, tmp_path):
    """The worker holding grid shard 2 is killed: the scheduler reruns that task on a worker that
    lives. On the same cluster, grid shard 0's first attempt fails: it is logged and retried in its
    worker, and neither reaches the terminal."""
    cache, release = tmp_path / "worker-loss", tmp_path / "release"
    env = {**os.environ, HOLD: f"grid:2:{release}", FAIL: "grid:0:1"}
    proc = subprocess.Popen([*SHNET, "extract", str(photo_dir), "-o", str(cache), *SMOKE, "--workers", "2",
                             "--shard-size", "1", "--stages", "grid"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    waiting = Path(f"{release}.waiting")
    _wait_for(waiting, proc)
    victim = int(waiting.read_text())
    os.kill(victim, signal.SIGKILL)
    assert _gone(victim)
    release.touch()
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    store = Cache(cache)
    assert store.is_stage_complete("grid")
    assert store.done_marker("grid", 2)["pid"] not in (victim, proc.pid), "shard 2 was redone by another worker"
    table = pd.read_parquet(cache / "grid" / "table")
    assert len(table) == 7 and table["image_id"].is_unique and (table["status"] == "ok").all()
    log = Cache.error_log_path(cache).read_text()
    # (Dask may run the task again when the killed worker held its result: attempt 1 fails again)
    assert "stage grid shard 0 attempt 1/3" in log and "stage grid shard 0 attempt 2/3" not in log and "InjectedFault" in log
    assert store.done_marker("grid", 0)["pid"] != proc.pid
    assert "Traceback" not in output and "Compute Failed" not in output, output
    assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_extract_on_an_existing_dask_cluster(mixed_cache, mixed_dir, tmp_path, extract):
    """Two external workers write what the in-process run wrote (each worker with the machine's
    threads, as that run had), both doing work and building each model once. (One worker: the
    killed-run test.)"""
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
        extract(mixed_dir, "-o", cache, *MIXED, "--scheduler", address, cluster=True)
        store = Cache(cache)
        assert store.is_stage_complete("grid") and store.is_stage_complete("saliency")
        import psutil

        markers = [store.done_marker(stage, s) for stage in ("probe", "grid", "saliency") for s in range(store.num_shards)]
        pids = {m["pid"] for m in markers}
        worker_pids = {c.pid for p in procs[1:] for c in psutil.Process(p.pid).children(recursive=True)} | {p.pid for p in procs[1:]}
        assert pids <= worker_pids and len(pids) == 2, "both external workers did the work"
        grid = [m for m in markers if m["stage"] == "grid"]
        assert [m["model_built"] for m in grid].count(True) == len({m["pid"] for m in grid})
        assert_same_cache(cache, mixed_cache[0])
        assert CliRunner().invoke(main, ["verify", str(cache)]).exit_code == 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_learned_saliency_backend_with_local_weights(tmp_path, extract):
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
    extract(folder, "-o", cache, "--profile", "smoke", "--stages", "saliency",
            "--set", "saliency.backend=msinet", "--set", f"saliency.weights={weights}", "--set", "saliency.resolution=24")
    store = Cache(cache)
    maps = [store.read("saliency", "saliency", i).astype(np.float32) for i in ("coffee", "rocket")]
    assert all(m.shape == (24, 24) and 0 <= m.min() and m.max() <= 1 and m.std() > 0 for m in maps)
    assert store.stage_config("saliency")["weights_sha256"] == file_sha256(weights)


def test_a_bad_weights_file_is_refused_before_anything_is_created(photo_dir, tmp_path):
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
        result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(cache), *SMOKE, "--set", f"grid.weights={weights}"])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert str(weights) in result.output and "weights_only" not in result.output
        assert not cache.exists(), "nothing may be created before the config is known to be good"
    assert not _worker_processes(), "a refused run leaves no worker process"


def test_counts_below_one_are_refused(photo_dir, tmp_path):
    for flag in ("--workers", "--shard-size", "--batch-size", "--threads-per-worker"):
        for value in ("0", "-2"):
            result = CliRunner().invoke(main, ["extract", str(photo_dir), "-o", str(tmp_path / "c"), *SMOKE, flag, value])
            assert result.exit_code == 2 and flag in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_in_process_refuses_a_worker_count(photo_dir, tmp_path, extract):
    result = extract(photo_dir, "-o", tmp_path / "c", *SMOKE, "--workers", 2, ok=False)
    assert result.exit_code == 1 and "--workers" in result.output and "--scheduler in-process" in result.output, result.output
    assert not (tmp_path / "c").exists()


def test_a_failing_shard_is_one_line_and_its_traceback_goes_to_the_log(photo_dir, tmp_path, extract):
    """(On a cluster, with the terminal of a real process: the worker-loss test.)"""
    cache = tmp_path / "failing"
    extract(photo_dir, "-o", cache, *SMOKE, "--shard-size", 3, "--stages", "saliency")
    (cache / "grid" / "00001.h5").mkdir(parents=True)  # the commit's rename onto it fails, for real
    result = extract(photo_dir, "-o", cache, *SMOKE, "--stages", "grid", ok=False)
    output = result.output
    assert result.exit_code == 1
    assert "1 shard(s) failed" in output and "grid shard 1: IsADirectoryError" in output, output
    assert "Traceback" not in output and "Compute Failed" not in output, output
    log = Cache.error_log_path(cache)
    assert str(log) in output
    text = log.read_text()
    assert text.count("stage grid shard 1 attempt") == 3 and "Traceback (most recent call last)" in text
    store = Cache(cache)
    assert store.done_shards("grid") == [0, 2] and not list(cache.rglob("*.tmp-*"))


def test_a_failed_attempt_is_logged_and_retried(photo_dir, tmp_path, extract, monkeypatch):
    cache = tmp_path / "flaky"
    monkeypatch.setenv(FAIL, "grid:1:2")  # the first two of the three attempts fail
    result = extract(photo_dir, "-o", cache, *SMOKE, "--shard-size", 3, "--stages", "grid")
    assert "shard(s) failed" not in result.output and "failed:" not in result.output, result.output
    text = Cache.error_log_path(cache).read_text()
    assert [line.split(" (pid")[0].split(" stage ")[1] for line in text.splitlines() if line.startswith("=== ")] == [
        "grid shard 1 attempt 1/3", "grid shard 1 attempt 2/3"]
    assert text.count("faults.InjectedFault: SHNET_FAULT_FAIL") == 2 and Cache(cache).is_stage_complete("grid")


def test_stages_describe_themselves_and_the_runner_names_none():
    from shnet.pipeline import executors, runner, stages, worker
    from shnet.pipeline.stages import STAGES, user_stages

    assert sorted(STAGES) == ["grid", "layout", "panoptic", "probe", "regions", "saliency"]
    assert user_stages() == sorted(set(STAGES) - {"probe"}) and STAGES["probe"].internal
    accelerated = {name for name, stage in STAGES.items() if stage.needs_accelerator(stage.defaults)}
    assert accelerated == {"grid", "regions", "panoptic"}, "probe, layout and spectral saliency never wait for a GPU slot"
    assert STAGES["saliency"].needs_accelerator({**STAGES["saliency"].defaults, "backend": "msinet"})
    assert not STAGES["panoptic"].needs_accelerator({**STAGES["panoptic"].defaults, "backend": "coco"})
    for module in (runner, worker, executors, stages):
        source = Path(module.__file__).read_text()
        assert not [name for name in STAGES if f"'{name}'" in source or f'"{name}"' in source or f"{name}." in source], module


def test_the_probe_finds_with_a_reduced_decode_what_a_full_decode_finds(mixed_dir, tmp_path):
    """Same sizes (EXIF orientation included) and the same refusals, with the same messages."""
    from PIL import Image

    from shnet.errors import ImageDecodeError
    from shnet.pipeline.images import decode_image
    from shnet.pipeline.stages.probe import probe_image

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.open(mixed_dir / "places" / "china.jpg").save(rotated, exif=exif)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(rotated.read_bytes()[:-300])
    paths = sorted(p for p in mixed_dir.rglob("*") if p.is_file()) + [rotated, cut]
    refusals, decoded = [], 0
    for path, max_pixels in [(p, 89_478_485) for p in paths] + [(rotated, 1000)]:
        try:
            rgb = decode_image(path, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            with pytest.raises(ImageDecodeError) as probed:
                probe_image(path, max_pixels)
            assert str(probed.value) == str(exc)
            refusals.append(str(exc))
        else:
            assert probe_image(path, max_pixels) == (rgb.shape[1], rgb.shape[0]), path
            decoded += 1
    assert probe_image(rotated, 89_478_485)[::-1] == Image.open(rotated).size
    assert decoded == 8 and len(refusals) == 5
    reasons = ("empty", "not an image", "truncated", "decompression-bomb")
    assert [sum(reason in message for message in refusals) for reason in reasons] == [1, 1, 2, 1], refusals


def test_each_worker_builds_its_model_once_while_the_probe_runs(photo_dir, tmp_path):
    """The probe's first task is held until the grid model is built: the worker built it ahead
    (the run would otherwise wait forever, and the test fails at its deadline), once, in the worker
    that then runs every grid shard with it."""
    cache, release, built = tmp_path / "ahead", tmp_path / "release", tmp_path / "built"
    built.mkdir()
    env = {**os.environ, HOLD: f"probe:0:{release}", BUILT: str(built)}
    proc = subprocess.Popen([*SHNET, "extract", str(photo_dir), "-o", str(cache), *SMOKE, "--workers", "1", "--shard-size", "4",
                             "--stages", "grid"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        waiting = Path(f"{release}.waiting")
        _wait_for(waiting, proc)
        deadline = time.monotonic() + 240
        while not list(built.glob("grid.*")):
            assert time.monotonic() < deadline, "the grid model was not built while the probe was held"
            time.sleep(0.02)
        assert not Cache(cache).done_shards("probe"), "the probe is still held"
        release.touch()
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    worker = int(waiting.read_text())
    assert {p.name: p.read_text() for p in built.iterdir()} == {f"grid.{worker}": "1"}, "built once, in the worker"
    store = Cache(cache)
    markers = [store.done_marker("grid", s) for s in range(store.num_shards)]
    assert {m["pid"] for m in markers} == {worker}
    assert sorted(m["model_built"] for m in markers) == [False, True], "the first task that takes the model reports it built"


def test_the_workers_build_the_models_while_this_process_checks_the_configs(photo_dir, tmp_path, extract, monkeypatch):
    """On a new cache the embedded workers are set up as soon as the configs are resolved: this
    process's check of the grid config waits here until a worker has built the grid model (it would
    wait forever, and fail at its deadline, if the build came after the check)."""
    from shnet.pipeline.stages.grid import GridStage

    built = tmp_path / "built"
    built.mkdir()
    monkeypatch.setenv(BUILT, str(built))
    checks = []

    def check_once_a_worker_built_the_model(self, config):
        deadline = time.monotonic() + 120
        while not list(built.glob("grid.*")):
            assert time.monotonic() < deadline, "no worker built the grid model while the config was checked"
            time.sleep(0.02)
        checks.append(config["model"])

    monkeypatch.setattr(GridStage, "check", check_once_a_worker_built_the_model)
    extract(photo_dir, "-o", tmp_path / "cache", *SMOKE, "--stages", "grid", "--workers", "1", cluster=True)
    assert checks == ["resnet50"] and [p.read_text() for p in built.iterdir()] == ["1"]
    assert Cache(tmp_path / "cache").is_stage_complete("grid")


def test_a_failed_build_ahead_is_reported_as_the_tasks_own_failed_build(photo_dir, tmp_path, extract, monkeypatch):
    """A build ahead that fails hands its error to the first task that needs the model: that attempt
    fails with it (one line, the traceback in the log), the next ones build again, as without it."""
    from shnet.pipeline import runner, worker
    from shnet.pipeline.stages import get_stage

    builds = []

    def failing_load(config, device):
        builds.append(device)
        raise RuntimeError("the weights went away")

    monkeypatch.setattr(get_stage("grid"), "load", failing_load)
    outputs, logs = [], []
    for ahead in (False, True):
        if ahead:
            real = runner.run_in_process

            def built_ahead_first(tasks, device):
                models = list({t.job.stage: (t.job.stage, t.job.config) for t in tasks}.values())
                worker.build_ahead(models, device).join()
                return real(tasks, device)

            monkeypatch.setattr(runner, "run_in_process", built_ahead_first)
        builds.clear()
        cache = tmp_path / f"ahead-{ahead}"
        result = extract(photo_dir, "-o", cache, *SMOKE, "--shard-size", 4, "--stages", "grid", ok=False)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        outputs.append(sorted(line.strip() for line in result.output.splitlines() if "grid shard" in line))
        text = Cache.error_log_path(cache).read_text()
        logs.append(sorted(line.split(" (pid")[0].split(" stage ")[1] for line in text.splitlines() if line.startswith("=== ")))
        assert text.count("RuntimeError: the weights went away") == 6 and len(builds) == 6, "3 attempts per shard, one build each"
    assert outputs[0] == outputs[1] and any("RuntimeError: the weights went away" in line for line in outputs[1]), outputs
    assert logs[0] == logs[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_a_worker_process_keeps_the_memory_a_batch_freed_for_the_next():
    """A worker (started by Dask with MALLOC_TRIM_THRESHOLD_ set) keeps its heap's freed top instead of
    giving it back after every batch and faulting it in again for the next."""
    script = (
        "import os, numpy as np\n"
        "from shnet.pipeline.worker import setup_process\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "setup_process(1, 'cpu')\n"
        "before = rss()\n"
        "batch = [np.ones(2_000_000) for _ in range(20)]  # 16 MB each: below the mmap threshold, in the heap\n"
        "del batch\n"
        "print((rss() - before) >> 20)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"})
    assert int(result.stdout) >= 250, f"{result.stdout.strip()} MB of the 320 MB freed kept"


def test_a_task_in_an_embedded_worker_keeps_the_large_buffers_it_freed_for_the_next_batch():
    """A task runs in a thread of the worker: its 80 MB buffers (an activation's size) come from the one
    heap and stay there when freed, instead of being mapped afresh and faulted in every batch."""
    from dask.distributed import Client

    from shnet.pipeline import executors

    def kept_megabytes():
        import numpy as np

        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
        before = rss()
        batch = [np.ones(10_000_000) for _ in range(8)]
        del batch
        return (rss() - before) >> 20

    cluster = executors.start_local_cluster(SimpleNamespace(threads_per_worker=1, device="cpu"), 1)
    try:
        with Client(cluster) as client:
            kept = client.submit(kept_megabytes, pure=False).result()
    finally:
        cluster.close()
    assert kept >= 500, f"{kept} MB of the 640 MB freed kept"


def test_embedded_workers_run_without_dask_s_profiler_and_monitors_and_keep_the_rest_of_the_config():
    import dask
    from dask.distributed import Client

    from shnet.pipeline import executors

    request = SimpleNamespace(threads_per_worker=1, device="cpu")
    cluster = executors.start_local_cluster(request, 1)
    try:
        with Client(cluster) as client:
            keys = ("worker.profile.enabled", "worker.memory.pause", "worker.memory.terminate", "worker.memory.monitor-interval", "admin.system-monitor.interval", "admin.tick.interval", "scheduler.work-stealing")
            seen = client.run(lambda: [dask.config.get(f"distributed.{key}") for key in keys])
            worker_ticks = client.run(lambda dask_worker: dask_worker.periodic_callbacks["tick"].callback_time)
        ticks = [cluster.scheduler.periodic_callbacks["tick"].callback_time] + [nanny.periodic_callbacks["tick"].callback_time for nanny in cluster.workers.values()]
    finally:
        cluster.close()
    assert list(seen.values()) == [[False, False, dask.config.get("distributed.worker.memory.terminate"), "1s", "5s", "1s", dask.config.get("distributed.scheduler.work-stealing")]]
    assert ticks == [1000, 1000] and list(worker_ticks.values()) == [1000]  # scheduler, nanny, worker: ms
    assert dask.config.get("distributed.worker.profile.enabled")  # this process's own config untouched
    assert dask.config.get("distributed.admin.tick.interval") == "20ms"


def test_embedded_workers_log_dask_records_to_the_cache_not_the_terminal(tmp_path):
    """What a worker of the embedded cluster logs through Dask (e.g. a heartbeat meeting the closing
    scheduler, with its traceback) is appended to CACHE/logs/dask-workers.log, never printed."""
    log = tmp_path / "logs" / "dask-workers.log"
    script = (
        "import logging, distributed\n"
        "from shnet.pipeline.executors import log_library_records_to\n"
        f"log_library_records_to({str(log)!r})\n"
        "try:\n    raise OSError('scheduler gone')\n"
        "except OSError:\n    logging.getLogger('distributed.worker').exception('Failed to communicate with scheduler during heartbeat.')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout == "" and result.stderr == ""
    written = log.read_text()
    assert "distributed.worker ERROR Failed to communicate with scheduler" in written and "OSError: scheduler gone" in written


@pytest.mark.parametrize("device, threads, ahead", [("cpu", 2, False), ("cpu", 1, True), ("cuda:0", 2, True)])
def test_a_batch_is_decoded_ahead_unless_a_team_of_torch_threads_runs_the_model_on_the_cpu(photo_dir, device, threads, ahead):
    """A decode thread beside a team of torch threads on the CPU preempts one of them (and the team
    waits for it): there the next batch is decoded in line, in the task's thread; elsewhere ahead."""
    import threading

    import torch

    from shnet.pipeline.images import discover_images
    from shnet.pipeline.stages.base import ImageStage, ShardJob

    class Recording(ImageStage):
        threads_seen: list = []

        def prepare(self, rgb, config, model):
            self.threads_seen.append(threading.current_thread().name)
            return rgb.shape

    images = discover_images([photo_dir]).assign(row=lambda t: range(len(t)), status="ok", error="")
    job = ShardJob(cache_root="", stage="recording", shard=0, images=images, config={}, device=device, batch_size=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batches = list(Recording()._prefetched_batches(images, job, None))
    finally:
        torch.set_num_threads(before)
    assert sum(len(rows) for rows, *_ in batches) == len(images) >= 3
    in_task_thread = {name == threading.current_thread().name for name in Recording.threads_seen}
    assert in_task_thread == {not ahead}, Recording.threads_seen
