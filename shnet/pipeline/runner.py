"""``shnet extract``: plan the cache, then run one task per (stage, shard) that is not done yet.

Order of work: resolve stage configs (every option checked before the cache is touched or a task
runs) while the images are listed, take the cache lock, create or check the cache record (same
images, same shard size, same stage configs), drop stale temporaries, and run only the incomplete
(stage, shard) pairs, shard by shard, each stage after the stages it needs, on a Dask cluster or in this process
(:mod:`.executors`). Results stream back as small summaries. No stage is known here by name: what
differs between stages is what they say about themselves.

Start-up is kept off the critical path (:class:`Startup`): while the configs are resolved, a background
thread lists the images and starts the embedded cluster for a new cache; each worker then builds the
run's models while this process checks the configs and the probe runs
(:func:`~shnet.pipeline.worker.build_ahead`). No run waits for that cluster's workers to exit, whether
it ended or was refused before its first task (a config, the lock).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from ..devices import extract_device
from ..errors import CacheError, ShnetError
from ..fileio import atomic_write_parquet, writable_destination
from .images import checked_roots, discover_images
from .profiles import apply_overrides, load_profile
from .executors import IN_PROCESS, ClusterStart, Task, planned_task_count, run_in_process, run_on_dask
from .stages import STAGES, all_stages, get_stage, user_stages, with_dependencies
from .stages.base import ShardJob
from ..cache.store import (
    CACHE_RECORD,
    IMAGES_TABLE,
    LIBRARY_LOG,
    LOCK_FILE,
    Cache,
    CacheLock,
    create_cache,
    image_list_digest,
    plan_shards,
    record_stage_config,
    stage_config_recorded,
)

DEFAULT_SHARD_SIZE = 1000


@dataclass
class ExtractRequest:
    image_dirs: list[str]
    cache: str
    stages: list[str] | None = None
    profile: str = "default"
    overrides: list[str] = field(default_factory=list)
    workers: int | None = None
    threads_per_worker: int = 1
    scheduler: str | None = None  # a Dask scheduler's address, or IN_PROCESS (None: an embedded cluster)
    device: str = "cpu"
    shard_size: int | None = None
    batch_size: int = 8
    refuse_damaged: bool = False  # refuse a cache with a damaged done shard instead of redoing it


@dataclass
class StageTally:
    shards_total: int = 0
    shards_skipped: int = 0
    shards_done: int = 0
    images: int = 0
    errors: int = 0
    first_start: float | None = None
    last_finish: float | None = None
    models_built: int = 0
    failed: list = field(default_factory=list)

    @property
    def images_per_second(self) -> float | None:
        """Images over the wall-clock span from this stage's first task start to its last finish."""
        if self.first_start is None or self.last_finish <= self.first_start:
            return None
        return self.images / (self.last_finish - self.first_start)


@dataclass
class ExtractReport:
    cache: str
    stages: list[str]
    tallies: dict[str, StageTally]
    num_images: int
    failed_images: int
    wall_seconds: float
    nothing_to_do: bool = False
    redone: list = field(default_factory=list)  # (stage, shard, what was wrong) of damaged done shards

    @property
    def failed_shards(self) -> list:
        return [f for t in self.tallies.values() for f in t.failed]


def check_request(request: ExtractRequest) -> None:
    """Refuse counts that make no sense instead of silently replacing them."""
    for flag, value in (
        ("--workers", request.workers),
        ("--threads-per-worker", request.threads_per_worker),
        ("--shard-size", request.shard_size),
        ("--batch-size", request.batch_size),
    ):
        if value is not None and value < 1:
            raise ShnetError(f"{flag} must be at least 1 (got {value})")
    if request.scheduler == IN_PROCESS and request.workers is not None:
        raise ShnetError(f"--workers sets the embedded cluster's size; --scheduler {IN_PROCESS} runs every task in this process (drop one of them)")
    writable_destination(request.cache, "the cache")


def requested_stages(request: ExtractRequest) -> tuple[list[str], dict]:
    """The stages to run (with their needs) and the options given for them (profile + ``--set``)."""
    profile = load_profile(request.profile)
    options = apply_overrides(profile["stages"], request.overrides)
    unknown = sorted(set(options) - set(STAGES))
    if unknown:
        raise ShnetError(f"unknown stage(s) in profile/--set: {', '.join(unknown)}; available stages: {', '.join(user_stages())}")
    requested = request.stages or [name for name in profile["stages"] if name in user_stages()]
    return with_dependencies(requested), options


def resolved_configs(stages: list[str], options: dict) -> dict[str, dict]:
    """Each stage's config resolved: defaults filled, every option checked, weights hashed."""
    return {name: get_stage(name).resolve_config(options.get(name) or {}) for name in stages}


def check_configs(configs: dict[str, dict]) -> None:
    """What each stage's workers would otherwise find too late: weights read and matched, label maps,
    folders."""
    for name, config in configs.items():
        get_stage(name).check(config)


class Startup:
    """What an extract prepares before its first task, off the critical path: in a background thread,
    the images are listed and, for a new cache on an embedded cluster, the LocalCluster is started
    (sized by the planned task count), while this process resolves the stage configs; its workers
    then build the run's models (:meth:`build_ahead`) while this process checks those configs. A
    cache that already exists gets its cluster only once the run knows it has work to do there (a
    finished cache starts none). Errors keep their order: a config error first, then an
    image-listing one. An extract refused or interrupted before its first task waits for none of it:
    :meth:`close` leaves the listing to end on its own (no cluster is started after it) and stops the
    cluster's workers at once, builds and all (:class:`~.executors.ClusterStart`)."""

    def __init__(self, request: ExtractRequest, stages: list[str], root: str):
        self._request = request
        self._images: pd.DataFrame | None = None
        self._error: BaseException | None = None
        self._cluster: ClusterStart | None = None
        self._cluster_error: BaseException | None = None
        self._models: list[tuple[str, dict]] | None = None
        self._closing = threading.Lock()  # taken to start the cluster, to hand it the models, and by close()
        self._closed = False
        self._listed = threading.Thread(target=self._list_and_start, args=(stages, root), name="shnet-startup", daemon=True)
        self._listed.start()

    def _list_and_start(self, stages: list[str], root: str) -> None:
        try:
            self._images = discover_images(self._request.image_dirs)
        except BaseException as exc:  # noqa: BLE001 - raised in the run's thread by images()
            self._error = exc
            return
        with self._closing:
            if self._closed or self._request.scheduler is not None or not _new_cache_at(root):
                return
            shard_size = self._request.shard_size or DEFAULT_SHARD_SIZE
            try:
                cluster = ClusterStart(self._request, planned_task_count(len(self._images), len(stages), shard_size), str(Cache.library_log_path(root)))
            except BaseException as exc:  # noqa: BLE001 - raised in the run's thread by cluster()
                self._cluster_error = exc
                return
            self._cluster = cluster
            if self._models is not None:
                cluster.build(self._models)

    def build_ahead(self, models: list[tuple[str, dict]]) -> None:
        """The run's (stage, config) pairs, resolved: the cluster started ahead (now or once it is)
        has its workers build them while this process checks the configs."""
        with self._closing:
            self._models = models
            if self._cluster is not None:
                self._cluster.build(models)

    def images(self) -> pd.DataFrame:
        """The images found (raising what stopped the listing)."""
        self._listed.join()
        if self._error is not None:
            raise self._error
        return self._images

    def cluster(self):
        """The LocalCluster started ahead (waiting for its workers, set up to build the models given
        to :meth:`build_ahead`), or None: start one when needed."""
        self._listed.join()
        if self._cluster_error is not None:
            raise self._cluster_error
        return self._cluster.get() if self._cluster is not None else None

    def close(self) -> None:
        with self._closing:
            self._closed = True
            cluster = self._cluster
        if cluster is not None:
            cluster.close()


# what a new cache's folder may hold before the cache is created: the lock, and the folder of the log
# that workers set up ahead write Dask's records to (made by their first record)
_BEFORE_THE_CACHE = {LOCK_FILE, Path(LIBRARY_LOG).parts[0]}


def _new_cache_at(root: str) -> bool:
    """Whether ``root`` is free for a new cache (absent, or empty but for a lock file and the workers'
    log folder): a run there has every (stage, shard) to do."""
    return not os.path.isdir(root) or all(entry.name in _BEFORE_THE_CACHE for entry in os.scandir(root))


def open_or_create_cache(root: str, images: pd.DataFrame, image_dirs: list[str], shard_size: int | None) -> Cache:
    """The existing cache after checking it was planned over the same images, or a new one."""
    if os.path.exists(os.path.join(root, CACHE_RECORD)):
        return open_existing_cache(root, images, shard_size)
    if os.path.exists(root) and any(entry.name not in _BEFORE_THE_CACHE for entry in os.scandir(root)):
        raise CacheError(f"{root} exists, is not empty and is not a shnet cache; choose a new -o directory")
    return create_cache(root, images, shard_size or DEFAULT_SHARD_SIZE, image_dirs)


def open_existing_cache(root: str, images: pd.DataFrame, shard_size: int | None) -> Cache:
    """The cache at ``root`` after checking (read-only) that it was planned over the same images
    and shard size."""
    cache = Cache(root)
    if shard_size is not None and shard_size != cache.shard_size:
        raise CacheError(
            f"{cache.root} was planned with --shard-size {cache.shard_size}; re-run with that size (or omit it), "
            "or extract into a new cache"
        )
    if image_list_digest(images["image_id"]) != cache.record["image_list_sha256"]:
        planned = set(cache.images()["image_id"])
        found = set(images["image_id"])
        raise CacheError(
            f"the image folders changed since {cache.root} was planned: {len(found - planned)} new, "
            f"{len(planned - found)} missing (e.g. {sorted((found - planned) or (planned - found))[:3]}); "
            "extract the new set into a new cache directory"
        )
    return cache


def finished_cache(root: str, images: pd.DataFrame, request: ExtractRequest, stages: list[str], configs: dict) -> Cache | None:
    """The cache at ``root`` when this request has nothing left to do there (every stage recorded
    with this config, every shard done, images.parquet up to date), found without writing anything
    and without the lock, so that a finished cache on a read-only or synced filesystem stays
    untouched. Refuses, as a run would, a cache planned otherwise or holding other configs."""
    if not os.path.exists(os.path.join(root, CACHE_RECORD)):
        return None
    cache = open_existing_cache(root, images, request.shard_size)
    recorded = [stage_config_recorded(cache, name, configs[name], get_stage(name).location_keys) for name in stages]
    if not all(recorded) or not all(cache.is_stage_complete(name) for name in stages):
        return None
    if any(cache.damaged_shards(name) for name in stages):
        return None
    current = cache.images()
    expected = images_table(cache, plan_shards(images, cache.shard_size))
    return cache if expected.equals(current[expected.columns]) and list(current.columns) == list(expected.columns) else None


def run_extract(request: ExtractRequest, display=None) -> ExtractReport:
    """Run an extract to completion (or as far as it gets) and report what happened."""
    from .progress import ExtractDisplay

    display = display or ExtractDisplay()
    started = time.perf_counter()
    check_request(request)
    request = replace(request, device=extract_device(request.device, local=request.scheduler in (None, IN_PROCESS)))
    checked_roots(request.image_dirs)
    stages, options = requested_stages(request)
    root = os.path.abspath(os.path.expanduser(request.cache))
    startup = Startup(request, stages, root)
    try:
        configs = resolved_configs(stages, options)
        startup.build_ahead([(name, configs[name]) for name in stages])
        check_configs(configs)
        images = startup.images()
        done = finished_cache(root, images, request, stages, configs)
        if done is not None:
            return ExtractReport(
                cache=str(done.root),
                stages=stages,
                tallies={name: StageTally(shards_total=done.num_shards, shards_skipped=done.num_shards) for name in stages},
                num_images=len(images),
                failed_images=int((done.images()["status"] == "error").sum()),
                wall_seconds=time.perf_counter() - started,
                nothing_to_do=True,
            )
        with CacheLock(root):
            cache = open_or_create_cache(root, images, [os.path.abspath(d) for d in request.image_dirs], request.shard_size)
            for name in stages:
                record_stage_config(cache, name, configs[name], get_stage(name).location_keys)
            cache.remove_stale_temporaries()
            redone = reopen_damaged_shards(cache, stages, request.refuse_damaged)
            planned = plan_shards(images, cache.shard_size)
            tallies = {name: StageTally(shards_total=cache.num_shards) for name in stages}
            pending = []
            for shard in range(cache.num_shards):
                for name in stages:
                    if cache.is_done(name, shard):
                        tallies[name].shards_skipped += 1
                    else:
                        pending.append((name, shard))
            if pending:
                display.start(stages, {name: _images_in(planned, cache, name) for name in stages}, tallies)
                tasks = _tasks(request, cache, planned, configs, pending)
                if request.scheduler == IN_PROCESS:
                    results = run_in_process(tasks, request.device)
                else:
                    results = run_on_dask(tasks, request, startup.cluster())
                try:
                    for task, summary in results:
                        _tally(tallies[task.job.stage], task, summary, display)
                finally:
                    display.stop()
            _write_images_table(cache, planned)
            failed_images = int((cache.images()["status"] == "error").sum())
    finally:
        startup.close()
    return ExtractReport(
        cache=str(cache.root),
        stages=stages,
        tallies=tallies,
        num_images=len(planned),
        failed_images=failed_images,
        wall_seconds=time.perf_counter() - started,
        nothing_to_do=not pending,
        redone=redone,
    )


def reopen_damaged_shards(cache: Cache, stages: list[str], refuse: bool) -> list[tuple[str, int, str]]:
    """Done shards whose files fail their marker's cheap check (presence, sizes, signatures) lose
    the marker, so that this run redoes them; every good shard is kept. With ``refuse``, nothing is
    touched and the run stops naming them. Only call while holding the lock."""
    damaged = [(name, shard, problem) for name in stages for shard, problem in cache.damaged_shards(name).items()]
    if damaged and refuse:
        lines = "\n".join(f"  {name} shard {shard}: {problem}" for name, shard, problem in damaged)
        raise CacheError(
            f"{cache.root} has {len(damaged)} damaged shard(s) that its done markers no longer vouch for:\n{lines}\n"
            "Re-run without --refuse-damaged to redo them (the good shards are kept)."
        )
    for name, shard, _ in damaged:
        cache.done_path(name, shard).unlink()
    return damaged


def _images_in(planned: pd.DataFrame, cache: Cache, stage: str) -> tuple[int, int]:
    done = set(cache.done_shards(stage))
    total = len(planned)
    skipped = int(planned["shard"].isin(done).sum())
    return total, skipped


def _tasks(request, cache, planned, configs, pending) -> list[Task]:
    """One task per pending (stage, shard), in the pending order (needs first), each naming the
    pending tasks of the stages it requires or uses on the same shard."""
    by_shard = {shard: part for shard, part in planned.groupby("shard", sort=True)}
    keys = set(pending)
    tasks = []
    for name, shard in pending:
        stage = get_stage(name)
        job = ShardJob(
            cache_root=str(cache.root),
            stage=name,
            shard=int(shard),
            images=by_shard[shard][["image_id", "path", "row", "status", "error"]].reset_index(drop=True),
            config=configs[name],
            device=request.device,
            batch_size=request.batch_size,
        )
        needs = [(need, shard) for need in stage.requires + stage.uses if (need, shard) in keys]
        tasks.append(Task(job=job, needs=needs, accelerator=stage.needs_accelerator(configs[name])))
    return tasks


def _tally(tally: StageTally, task: Task, summary: dict, display) -> None:
    name, shard = task.key
    if summary.get("failed"):
        tally.failed.append((name, shard, summary["error"]))
        display.shard_failed(name, shard, summary["error"])
        return
    tally.shards_done += 1
    tally.images += summary["images"]
    tally.errors += summary.get("errors", 0)
    tally.models_built += int(summary.get("model_built", False))
    if "started_at" in summary:
        tally.first_start = min(summary["started_at"], tally.first_start or summary["started_at"])
        tally.last_finish = max(summary["finished_at"], tally.last_finish or summary["finished_at"])
    display.shard_done(name, summary)


def _write_images_table(cache: Cache, planned: pd.DataFrame) -> None:
    """Bring images.parquet up to date (written only when its content changes)."""
    frame = images_table(cache, planned)
    current = cache.images()
    if list(current.columns) == list(frame.columns) and frame.equals(current):
        return
    atomic_write_parquet(cache.root / IMAGES_TABLE, frame)


def images_table(cache: Cache, planned: pd.DataFrame) -> pd.DataFrame:
    """images.parquet's content: the plan (current paths) + the columns each stage contributes for
    the shards it has done (e.g. decode status and upright size)."""
    frame = planned.copy()
    for stage in all_stages():
        found = stage.image_columns(cache)
        if found is None:
            continue
        hit = frame["image_id"].isin(found.index)
        for column in found.columns:
            frame.loc[hit, column] = found.loc[frame.loc[hit, "image_id"], column].to_numpy()
    return frame
