"""What runs where the tasks run (a Dask worker process, or the extract's own process with
``--scheduler in-process``): the process setup, the per-process model cache (on a cluster, filled
ahead by :func:`build_ahead` while the probe runs), the shard task.

Nothing here knows a stage by name: a stage's needs annotate its images through their
``annotate_images`` hook before it runs."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback

from ..errors import ShnetError
from . import faults
from .stages import get_stage
from .stages.base import ShardJob
from ..cache.store import Cache, ShardWriter, config_hash

_MODELS: dict[tuple, object] = {}
_MODELS_LOCK = threading.Lock()  # guards the three tables below
_BUILD_LOCK = threading.Lock()  # one build at a time per process: random inits seed torch's global generator
_BUILT_AHEAD: set[tuple] = set()  # built before any task asked: the first task that takes one reports it built
_AHEAD_ERRORS: dict[tuple, Exception] = {}  # a build ahead that failed: raised to the first task that asks
_WORKER_DEVICE: dict[str, str] = {}


def setup_process(torch_threads: int, device: str, worker_name=None) -> str:
    """Pin thread pools, install the torchvision fallbacks, pick this worker's GPU. Returns the device."""
    import cv2
    import torch

    from ..torchvision_compat import ensure_torchvision

    _keep_large_allocations_in_the_heap()
    torch.set_num_threads(max(1, int(torch_threads)))
    cv2.setNumThreads(1)
    ensure_torchvision()
    return _select_device(device, worker_name)


def _select_device(device: str, worker_name) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        index = int(worker_name) % torch.cuda.device_count() if str(worker_name).isdigit() else 0
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    _WORKER_DEVICE["cuda"] = device
    return device


@contextlib.contextmanager
def in_this_process(device: str):
    """Run tasks in the calling process: the torchvision fallbacks and the device as a worker gets
    them, but the caller's thread pools left as they are; the models built are dropped at the end."""
    from ..torchvision_compat import ensure_torchvision

    ensure_torchvision()
    _select_device(device, None)
    try:
        yield
    finally:
        clear_models()
        _WORKER_DEVICE.clear()


def clear_models() -> None:
    with _MODELS_LOCK:
        _MODELS.clear()
        _BUILT_AHEAD.clear()
        _AHEAD_ERRORS.clear()


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 1 << 30

# The same settings as glibc reads them from the environment when a process starts: how the
# embedded workers are spawned, so that every thread of theirs gets the main heap from its first
# allocation (a thread that allocated before :func:`setup_process` keeps the arena it was given).
ALLOCATOR_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD_BYTES)}


def _keep_large_allocations_in_the_heap() -> None:
    """A model's activations are tens to hundreds of MB each, allocated and freed every batch. By
    default glibc maps each allocation above 32 MB afresh and unmaps it when freed, gives a heap's
    freed top back after every batch (Dask starts workers with MALLOC_TRIM_THRESHOLD_ at 64 KiB), and
    serves each further thread (Dask runs tasks in one) from an arena of its own, built of 64 MB
    mappings; every batch then page-faults its memory in again. So here: no mappings of their own for
    large allocations, one arena for all threads, up to 1 GiB of freed heap kept. ResNet-50 at 512,
    batch 8, two threads: 0.40-0.49 s/img in a main thread and 0.54-0.64 in another (4.3 and 6.2
    million page faults for 32 images), 0.32-0.33 in either with these (0.3 million)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(name)
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
            libc.mallopt(_M_ARENA_MAX, 1)


def worker_device(requested: str) -> str:
    """``cuda`` becomes the GPU this worker process was given at setup (``cuda:N``)."""
    return _WORKER_DEVICE.get(requested, requested)


def cached_model(stage_name: str, config: dict, device: str):
    """The stage's model for this process, built on first use (or taken from :func:`build_ahead`).
    Returns (model, built_now): ``built_now`` is true for the first task of this process that takes a
    model it built, whether it built it itself or the build ahead did."""
    key = (stage_name, config_hash(config), device)
    found = _take(key)
    if found is not None:
        return found
    with _BUILD_LOCK:
        found = _take(key)  # the build ahead may have finished it while this task waited
        if found is not None:
            return found
        model = _build(stage_name, config, device)
        with _MODELS_LOCK:
            _MODELS[key] = model
    return model, model is not None


def _take(key: tuple) -> tuple | None:
    """(model, built_now) when the model is here; raises the error of a build ahead that failed (once:
    the task's next attempt builds again, as it would have without the build ahead)."""
    with _MODELS_LOCK:
        if key in _MODELS:
            built = key in _BUILT_AHEAD
            _BUILT_AHEAD.discard(key)
            return _MODELS[key], built
        error = _AHEAD_ERRORS.pop(key, None)
    if error is not None:
        raise error
    return None


def _build(stage_name: str, config: dict, device: str):
    model = get_stage(stage_name).load(config, device)
    if model is not None:
        faults.model_built(stage_name)
    return model


def build_ahead(models: list[tuple[str, dict]], device: str) -> threading.Thread:
    """Build the ``(stage, config)`` models in a background thread of this process, one after the
    other, while its first tasks (the probe) run, so that the first task of each stage finds its
    model built. A build that fails is kept for the first task that asks, which reports it exactly as
    its own failed build (one line, the traceback in the error log)."""

    def build_all() -> None:
        for stage_name, config in models:
            key = (stage_name, config_hash(config), worker_device(device))
            with _BUILD_LOCK:
                with _MODELS_LOCK:
                    if key in _MODELS:
                        continue
                    _AHEAD_ERRORS.pop(key, None)
                try:
                    model = _build(stage_name, config, key[2])
                except Exception as exc:  # noqa: BLE001 - handed to the task that needs this model
                    with _MODELS_LOCK:
                        _AHEAD_ERRORS[key] = exc
                    continue
                with _MODELS_LOCK:
                    _MODELS[key] = model
                    if model is not None:
                        _BUILT_AHEAD.add(key)

    thread = threading.Thread(target=build_all, name="shnet-build-ahead", daemon=True)
    thread.start()
    return thread


def run_shard(job: ShardJob, *dependencies) -> dict:
    """Process one (stage, shard) and commit it; returns a small summary for the progress display.

    ``dependencies`` are the summaries of the tasks this one must follow (the stages it needs on the
    same shard): when one of them failed, this one does not run. A failure is retried in this
    process up to ``job.attempts`` times; every attempt's traceback goes to the cache's error log and
    the summary carries one line, so no raw traceback reaches the user's terminal. (A worker process
    that dies is another matter: the scheduler reruns its task on another worker.)
    """
    failed_need = next((d for d in dependencies if isinstance(d, dict) and d.get("failed")), None)
    if failed_need is not None:
        return _failure(job, f"not run: stage '{failed_need['stage']}' failed on this shard", attempts=0)
    for attempt in range(1, job.attempts + 1):
        try:
            faults.before_attempt(job.stage, job.shard, attempt)
            return _run_shard_once(job)
        except Exception as exc:  # noqa: BLE001 - reported as one line, the trace goes to the log
            _log_failure(job, attempt, exc)
            message = one_line(exc)
    return _failure(job, message, attempts=job.attempts)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type (unless it is shnet's own) and the first line of its message."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if isinstance(exc, ShnetError) else f"{type(exc).__name__}: {text}"


def _failure(job: ShardJob, error: str, attempts: int) -> dict:
    return {"stage": job.stage, "shard": job.shard, "failed": True, "error": error, "attempts": attempts, "images": 0}


def _log_failure(job: ShardJob, attempt: int, exc: BaseException) -> None:
    """Append the full traceback of a failed attempt to the cache's error log (one write per entry)."""
    path = Cache.error_log_path(job.cache_root)
    entry = (
        f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} stage {job.stage} shard {job.shard} attempt {attempt}/{job.attempts} "
        f"(pid {os.getpid()} on {socket.gethostname()})\n" + "".join(traceback.format_exception(exc)) + "\n"
    )
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(entry)


def _run_shard_once(job: ShardJob) -> dict:
    start = time.perf_counter()
    started_at = time.time()
    cache = Cache(job.cache_root)
    stage = get_stage(job.stage)
    if cache.is_done(job.stage, job.shard):
        return {"stage": job.stage, "shard": job.shard, "images": len(job.images), "skipped": True}
    job.device = worker_device(job.device)
    for need in stage.requires:
        job.images = get_stage(need).annotate_images(cache, job)
    model, built = cached_model(job.stage, job.config, job.device)
    attrs = {
        "config": job.config,
        "versions": library_versions(),
        "device": job.device,
        **stage.attrs(job.config, model),
    }
    with ShardWriter(cache, job.stage, job.shard, len(job.images), attrs) as writer:
        table = stage.run(job, writer, model)
        seconds = time.perf_counter() - start
        writer.commit(table, {"seconds": seconds, "model_built": built})
    return {
        "stage": job.stage,
        "shard": job.shard,
        "images": len(table),
        "errors": int((table["status"] == "error").sum()),
        "seconds": seconds,
        "model_built": built,
        "pid": os.getpid(),
        "started_at": started_at,
        "finished_at": time.time(),
        "skipped": False,
    }


def library_versions() -> dict:
    import h5py
    import numpy
    import torch

    from .. import __version__

    versions = {"shnet": __version__, "torch": torch.__version__, "numpy": numpy.__version__, "h5py": h5py.__version__}
    for name in ("torchvision", "timm", "cv2"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "")
    return versions
