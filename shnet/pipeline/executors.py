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

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import ShnetError
from .stages.base import ShardJob
from .worker import clear_models, in_this_process, one_line, run_shard, setup_process

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


def run_on_dask(tasks: list[Task], request) -> Iterator[tuple[Task, dict]]:
    """Submit every task to a Dask cluster (each after its needs) and yield them as they finish."""
    from dask.distributed import as_completed

    run_token = uuid.uuid4().hex[:6]
    gpu = {"GPU": 1} if request.device == "cuda" else None
    with dask_client(request, len(tasks)) as client:
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

    def __init__(self, torch_threads: int, device: str):
        self.torch_threads = torch_threads
        self.device = device

    def setup(self, worker) -> None:
        setup_process(self.torch_threads, self.device, worker.name)

    def teardown(self, worker) -> None:
        clear_models()


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


@contextlib.contextmanager
def dask_client(request, num_tasks: int):
    """A client on the embedded LocalCluster, or on the cluster at ``--scheduler``."""
    from dask.distributed import Client, LocalCluster

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
            client.register_plugin(WorkerSetup(per_worker, request.device), name=WorkerSetup.name)
            yield client
        finally:
            client.close()
        return
    n_workers = request.workers or default_workers(request.device)
    n_workers = max(1, min(n_workers, num_tasks))
    torch_threads = max(1, available_cores() // (n_workers * threads))
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=True,
        dashboard_address="127.0.0.1:0",  # None still starts one on 8787 (with a warning when taken)
        silence_logs=logging.ERROR,
        resources={"GPU": 1} if request.device == "cuda" else None,
    )
    client = Client(cluster)
    try:
        client.register_plugin(WorkerSetup(torch_threads, request.device), name=WorkerSetup.name)
        yield client
    finally:
        client.close()
        cluster.close()
