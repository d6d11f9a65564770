"""Where an extract's (stage, shard) tasks run.

``run_on_dask``: Dask worker processes, on an embedded LocalCluster or on an existing cluster at
``--scheduler ADDRESS``; a task waits for the tasks it needs, a worker process that dies has its task
rerun elsewhere. ``run_in_process`` (``--scheduler in-process``): this process, one task after
another in dependency order, calling the same shard function; no cluster to start, so it suits
small sets and debugging (breakpoints, profilers and tracebacks in the log all see one process).

Both take the same tasks and yield ``(task, summary)`` as tasks finish; a summary is what
:func:`~shnet.pipeline.worker.run_shard` returns, or a failure summary when Dask could not run the
task at all (e.g. its workers kept dying).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from distributed import Nanny
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from ..cache import Cache
from ..errors import ShnetError
from .stages.base import ShardJob
from .worker import ALLOCATOR_ENVIRONMENT, build_ahead, clear_models, in_this_process, one_line, run_shard, setup_process

IN_PROCESS = "in-process"


@dataclass
class Task:
    """One (stage, shard) to run, after the tasks named in ``needs`` (same shard, same run)."""

    job: ShardJob
    needs: list[tuple[str, int]] = field(default_factory=list)
    accelerator: bool = False  # takes a GPU slot when the run uses --device cuda

    @property
    def key(self) -> tuple[str, int]:
        return self.job.stage, self.job.shard


def run_in_process(tasks: list[Task], device: str) -> Iterator[tuple[Task, dict]]:
    """Run ``tasks`` (ordered so that needs come first) here, one after another."""
    results: dict[tuple[str, int], dict] = {}
    with in_this_process(device):
        for task in tasks:
            summary = run_shard(task.job, *[results[need] for need in task.needs])
            results[task.key] = summary
            yield task, summary


def run_on_dask(tasks: list[Task], request, cluster=None) -> Iterator[tuple[Task, dict]]:
    """Submit every task to a Dask cluster (each after its needs) and yield them as they finish.
    ``cluster``: the embedded LocalCluster already started and set up for these tasks' models
    (:class:`ClusterStart`); None: the cluster at ``request.scheduler``, or a LocalCluster started
    now for these tasks."""
    from dask.distributed import as_completed

    run_token = uuid.uuid4().hex[:6]
    gpu = {"GPU": 1} if request.device == "cuda" else None
    models = list({task.job.stage: (task.job.stage, task.job.config) for task in tasks}.values())
    log_file = str(Cache.library_log_path(tasks[0].job.cache_root)) if tasks else None
    with dask_client(request, len(tasks), models, cluster, log_file) as client:
        futures = {}
        owner = {}
        for task in tasks:
            name, shard = task.key
            futures[task.key] = client.submit(
                run_shard,
                task.job,
                *[futures[need] for need in task.needs],
                key=f"shnet-{name}-{shard:05d}-{run_token}",
                pure=False,
                resources=gpu if task.accelerator else None,
            )
            owner[futures[task.key].key] = task
        for future in as_completed(list(futures.values())):
            task = owner[future.key]
            if future.status == "error":  # the task itself could not run (e.g. its worker kept dying)
                name, shard = task.key
                yield task, {"stage": name, "shard": shard, "failed": True, "error": one_line(future.exception()), "images": 0}
            else:
                yield task, future.result()


class WorkerSetup(WorkerPlugin):
    """Dask worker plugin running :func:`~shnet.pipeline.worker.setup_process` in every worker,
    including restarted ones."""

    name = "shnet-worker-setup"

    def __init__(self, torch_threads: int, device: str, models: list[tuple[str, dict]], log_file: str | None = None):
        self.torch_threads = torch_threads
        self.device = device
        self.models = models  # (stage, config) of the run's tasks: built ahead, while the probe runs
        self.log_file = log_file  # embedded workers: Dask's own log records go here, not to the terminal

    def setup(self, worker) -> None:
        if self.log_file is not None:
            log_library_records_to(self.log_file)
        setup_process(self.torch_threads, self.device, worker.name)
        build_ahead(self.models, self.device)

    def teardown(self, worker) -> None:
        clear_models()


def log_library_records_to(path: str) -> None:
    """In an embedded worker, Dask's log records (e.g. a heartbeat that meets the scheduler closing at
    the end of a run, with its traceback) are appended to ``path`` instead of the terminal the worker
    shares with the user's command; shnet reports what a user needs itself."""
    handler = _FolderMadeOnFirstRecord(path, delay=True)  # created by the first warning, if any
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"%(asctime)s worker {os.getpid()} %(name)s %(levelname)s %(message)s"))
    library = logging.getLogger("distributed")
    for stream in [h for h in library.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]:
        library.removeHandler(stream)
    library.addHandler(handler)


class _FolderMadeOnFirstRecord(logging.FileHandler):
    """A log file whose folder, like the file, is made by the first record: a worker set up before the
    extract created its cache leaves the cache's folder as it found it."""

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def default_workers(device: str) -> int:
    if device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, min(available_cores(), 4))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def embedded_setup(cluster, request, models: list[tuple[str, dict]], log_file: str | None) -> WorkerSetup:
    """The setup of an embedded cluster's workers: each task thread gets its share of the cores as
    torch threads, and every worker builds ``models`` ahead and logs Dask's records to ``log_file``."""
    torch_threads = max(1, available_cores() // (len(cluster.worker_spec) * request.threads_per_worker))
    return WorkerSetup(torch_threads, request.device, models, log_file)


def worker_count(request, num_tasks: int) -> int:
    """The embedded cluster's worker processes: ``--workers`` or the default, never more than tasks."""
    return max(1, min(request.workers or default_workers(request.device), num_tasks))


def start_local_cluster(request, n_workers: int, wait: bool = True):
    """The embedded LocalCluster of ``n_workers`` worker processes, each given 1/n of the memory as
    LocalCluster would. ``wait=False``: returned as soon as its scheduler runs, its workers named in
    its spec but not started (awaiting the cluster in its loop starts them)."""
    from dask.distributed import LocalCluster

    with _embedded_tick():
        cluster = LocalCluster(
            n_workers=n_workers if wait else 0,
            threads_per_worker=request.threads_per_worker,
            memory_limit=1 / n_workers,
            processes=True,
            dashboard_address="127.0.0.1:0",  # None still starts one on 8787 (with a warning when taken)
            silence_logs=logging.ERROR,
            resources={"GPU": 1} if request.device == "cuda" else None,
            preload=list(WORKER_PRELOAD),
            config=embedded_worker_config(),
            worker_class=EmbeddedNanny,
        )
    while len(cluster.worker_spec) < n_workers:
        cluster.worker_spec.update(cluster.new_worker_spec())
    return cluster


def embedded_worker_config() -> dict:
    """This process's Dask config for the embedded workers, quieted: no statistical profiler (it
    samples every thread's stack every 10 ms for a dashboard nobody opens here), no spilling, target
    or pause (a task's results are small summaries, and a worker paused for its model's own memory
    would only stall the extract; the nanny still restarts one past ``terminate``), memory checked
    every second and the system monitor every 5 s instead of every 100 and 500 ms, the event loop's
    health checked every second instead of every 20 ms (:data:`EMBEDDED_TICK`). On 2 cores each
    wake-up stalls a model's two threads: the regions detector ran 8% slower with the profiler
    (0.906-0.922 against 0.836-0.837 s/img, alternating extracts) and 7% slower again with the
    monitors at their defaults (0.88-0.91 against 0.81-0.84 s/img, alternating runs in a worker).
    The whole tree, as the nanny replaces whole top-level sections with what it is given."""
    import dask

    quiet = {
        "worker": {"profile": {"enabled": False}, "memory": {"target": False, "spill": False, "pause": False, "monitor-interval": "1s"}},
        "admin": {"system-monitor": {"interval": "5s"}, "tick": {"interval": EMBEDDED_TICK}},
    }
    return dask.config.merge(dask.config.config, {"distributed": quiet})


class EmbeddedNanny(Nanny):
    """The nanny of an embedded worker: spawns it with glibc's allocator set as
    :func:`~shnet.pipeline.worker.setup_process` sets it (one heap for all threads, no mapping per
    large allocation, freed memory kept) in place of Dask's pre-spawn trim threshold, so that the
    thread Dask runs tasks in gets the main heap from its first allocation on; checks its event loop
    every :data:`EMBEDDED_TICK`."""

    def __init__(self, *args, **kwargs):
        with _embedded_tick():
            super().__init__(*args, **kwargs)
        self.pre_spawn_env.update(ALLOCATOR_ENVIRONMENT)
        self.env.update(ALLOCATOR_ENVIRONMENT)


# How often each server of the embedded cluster (scheduler, nannies, workers) checks that its event
# loop is responsive; Dask's default of 20 ms woke the extract's own process 150 times a second for
# its scheduler and two nannies: 6% of a core during a grid extract, 3% with this.
EMBEDDED_TICK = "1s"


def _embedded_tick():
    """This process's Dask config set, while a server of the embedded cluster is made here, to check
    its event loop every :data:`EMBEDDED_TICK` (a server reads it once, when made)."""
    import dask

    return dask.config.set({"distributed.admin.tick.interval": EMBEDDED_TICK})


# imported by each embedded worker as it starts (in the cluster's start, off the critical path),
# not when the first task or the setup plugin needs them
WORKER_PRELOAD = ("torch", "cv2")


class ClusterStart:
    """The embedded LocalCluster started ahead, so that its worker processes come up (interpreters,
    torch imported) while this process checks configs and lists images, and then build the run's
    models while the configs are checked here. ``num_tasks`` sizes it as :func:`run_on_dask` would.
    The scheduler starts here (no worker: milliseconds); the workers start in the cluster's own event
    loop and are set up (:class:`WorkerSetup`, logging to ``log_file``) as soon as :meth:`build` names
    the run's models. :meth:`get` waits for all that (raising what stopped it) and hands the cluster
    over; :meth:`close` shuts it down without waiting on its workers (:func:`close_quickly`): after a
    run, or when an extract is refused or interrupted before its first task, those still starting
    are killed, those that joined given a short grace."""

    def __init__(self, request, num_tasks: int, log_file: str | None = None):
        self._cluster = start_local_cluster(request, worker_count(request, num_tasks), wait=False)
        self._models: concurrent.futures.Future = concurrent.futures.Future()  # None: the run ends before building any
        # (scale() would start them too, but a failed start would then only be logged, not raised)
        self._workers = asyncio.run_coroutine_threadsafe(
            _started(self._cluster, self._models, request, log_file), self._cluster.loop.asyncio_loop
        )

    def build(self, models: list[tuple[str, dict]]) -> None:
        """Set the workers up to build ``models`` ((stage, config) pairs, resolved but maybe not yet
        checked: a run refused by the check closes the cluster, builds and all)."""
        if not self._models.done():
            self._models.set_result(models)

    def get(self):
        self._workers.result()
        return self._cluster

    def close(self) -> None:
        if not self._models.done():
            self._models.set_result(None)
        close_quickly(self._cluster, self._workers)


async def _started(cluster, models: concurrent.futures.Future, request, log_file: str | None) -> None:
    """Start the workers its spec names, then register the run's :class:`WorkerSetup` once its models
    are known (nothing to register when the run ends first)."""
    from dask.distributed import Client

    await cluster  # a SpecCluster awaited starts the workers its spec names
    run_models = await asyncio.wrap_future(models)
    if run_models is None:
        return
    async with Client(cluster.scheduler_address, asynchronous=True) as client:
        await client.register_plugin(embedded_setup(cluster, request, run_models, log_file), name=WorkerSetup.name)


def close_quickly(cluster, started: concurrent.futures.Future | None = None) -> None:
    """Close an embedded cluster without waiting on its workers (:func:`_stop_workers`): every task
    it ran has ended (its shard committed, or abandoned to the atomic writes and redone by the next
    run), so nothing a worker still holds is worth waiting for. A graceful close took 1.3 s of every
    extract. ``started``: the start of workers still coming up (:class:`ClusterStart`)."""
    asyncio.run_coroutine_threadsafe(_stop_workers(cluster, started), cluster.loop.asyncio_loop).result()
    cluster.close()


async def _stop_workers(cluster, started: concurrent.futures.Future | None) -> None:
    """Stop a cluster's worker processes without waiting for them: those still starting are killed
    until the start is over (each kill fails that worker's start at once; its nanny does not restart
    it), then those that joined are stopped with a short grace. Runs in the cluster's loop, where the
    nannies live."""
    while started is not None and not started.done():
        for nanny in list(cluster._created):  # every worker (nanny) the cluster made, started or not
            process = nanny.process  # its WorkerProcess: None until instantiated, pid None until spawned
            if process is not None and process.status == Status.starting and process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
    # (a nanny's close waits its timeout for the worker to exit, then kills it; it raises when the
    # killed process is not yet reaped, which the cluster's close that follows does not need)
    joined = [nanny for nanny in cluster._created if nanny.status == Status.running]
    await asyncio.gather(*(nanny.close(timeout=WORKER_GRACE_S) for nanny in joined), return_exceptions=True)


# how long an idle worker is given to exit before it is killed (a graceful exit, torch loaded, takes
# seconds on a busy machine)
WORKER_GRACE_S = 0.2


def planned_task_count(num_images: int, num_stages: int, shard_size: int) -> int:
    """Tasks of a new cache: every stage on every shard."""
    return num_stages * math.ceil(num_images / shard_size)


@contextlib.contextmanager
def dask_client(request, num_tasks: int, models: list[tuple[str, dict]], cluster=None, log_file: str | None = None):
    """A client on the embedded LocalCluster (``cluster``, started and set up ahead by
    :class:`ClusterStart`, or one started now), or on the cluster at ``--scheduler``, with
    :class:`WorkerSetup` registered: every worker builds ``models`` ahead; the embedded workers log
    Dask's records to ``log_file``."""
    from dask.distributed import Client

    threads = request.threads_per_worker
    if request.scheduler:
        try:
            client = Client(request.scheduler, timeout="20s")
        except OSError as exc:
            raise ShnetError(f"could not reach the Dask scheduler at {request.scheduler} ({exc}); is `dask scheduler` running?") from exc
        try:
            workers = client.scheduler_info()["workers"]
            if not workers:
                raise ShnetError(f"the Dask scheduler at {request.scheduler} has no workers; start some with `dask worker {request.scheduler}`")
            if request.device == "cuda" and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
                raise ShnetError("--device cuda needs workers started with `--resources GPU=1` (one GPU per worker)")
            per_worker = max(1, available_cores() // max(1, threads))
            client.register_plugin(WorkerSetup(per_worker, request.device, models), name=WorkerSetup.name)
            yield client
        finally:
            client.close()
        return
    owned = cluster is None
    if owned:
        cluster = start_local_cluster(request, worker_count(request, num_tasks))
    client = Client(cluster)
    try:
        if owned:
            client.register_plugin(embedded_setup(cluster, request, models, log_file), name=WorkerSetup.name)
        yield client
    finally:
        client.close()
        if owned:
            close_quickly(cluster)
