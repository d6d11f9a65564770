"""``shnet extract``: plan the cache, then run one Dask task per (stage, shard) that is not done yet.

Order of work: resolve stage configs (every option checked before anything starts), discover the
images, take the cache lock, create or check the cache record (same images, same shard size, same
stage configs), drop stale temporaries, and submit only the incomplete (stage, shard) pairs, shard
by shard, each stage after the stages it needs. Results stream back as small summaries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import pandas as pd

from ..errors import CacheError, ShnetError
from .images import discover_images
from .profiles import apply_overrides, load_profile
from .stages import get_stage, user_stages, with_dependencies
from .stages.base import ShardJob
from ..cache.store import (
    CACHE_RECORD,
    IMAGES_TABLE,
    LOCK_FILE,
    Cache,
    CacheLock,
    atomic_write_parquet,
    create_cache,
    image_list_digest,
    plan_shards,
    record_stage_config,
)
from .worker import WorkerSetup, run_shard

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
    scheduler: str | None = None
    device: str = "cpu"
    shard_size: int | None = None
    batch_size: int = 8


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

    @property
    def failed_shards(self) -> list:
        return [f for t in self.tallies.values() for f in t.failed]


def resolve_configs(request: ExtractRequest) -> tuple[list[str], dict[str, dict]]:
    """The stages to run (with their needs) and each one's checked config."""
    profile = load_profile(request.profile)
    options = apply_overrides(profile["stages"], request.overrides)
    unknown = sorted(set(options) - set(user_stages()) - {"probe"})
    if unknown:
        raise ShnetError(f"unknown stage(s) in profile/--set: {', '.join(unknown)}; available stages: {', '.join(user_stages())}")
    requested = request.stages or [name for name in user_stages() if name in profile["stages"]]
    stages = with_dependencies(requested)
    configs = {name: get_stage(name).resolve_config(options.get(name) or {}) for name in stages}
    for name in stages:
        get_stage(name).check(configs[name])
    return stages, configs


def open_or_create_cache(root: str, images: pd.DataFrame, image_dirs: list[str], shard_size: int | None) -> Cache:
    """The existing cache after checking it was planned over the same images, or a new one."""
    if os.path.exists(os.path.join(root, CACHE_RECORD)):
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
    if os.path.exists(root) and any(entry.name != LOCK_FILE for entry in os.scandir(root)):
        raise CacheError(f"{root} exists, is not empty and is not a shnet cache; choose a new -o directory")
    return create_cache(root, images, shard_size or DEFAULT_SHARD_SIZE, image_dirs)


def run_extract(request: ExtractRequest, display=None) -> ExtractReport:
    """Run an extract to completion (or as far as it gets) and report what happened."""
    from .progress import ExtractDisplay

    display = display or ExtractDisplay()
    started = time.perf_counter()
    stages, configs = resolve_configs(request)
    images = discover_images(request.image_dirs)
    root = os.path.abspath(os.path.expanduser(request.cache))
    with CacheLock(root):
        cache = open_or_create_cache(root, images, [os.path.abspath(d) for d in request.image_dirs], request.shard_size)
        for name in stages:
            record_stage_config(cache, name, configs[name], get_stage(name).location_keys)
        cache.remove_stale_temporaries()
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
            try:
                with dask_client(request, len(pending)) as client:
                    _submit_and_collect(client, request, cache, planned, stages, configs, pending, tallies, display)
            finally:
                display.stop()
        _write_images_table(cache, planned)
        failed_images = int((cache.images()["status"] == "error").sum())
    return ExtractReport(
        cache=str(cache.root),
        stages=stages,
        tallies=tallies,
        num_images=len(planned),
        failed_images=failed_images,
        wall_seconds=time.perf_counter() - started,
        nothing_to_do=not pending,
    )


def _images_in(planned: pd.DataFrame, cache: Cache, stage: str) -> tuple[int, int]:
    done = set(cache.done_shards(stage))
    total = len(planned)
    skipped = int(planned["shard"].isin(done).sum())
    return total, skipped


def _submit_and_collect(client, request, cache, planned, stages, configs, pending, tallies, display) -> None:
    from dask.distributed import as_completed

    run_token = uuid.uuid4().hex[:6]
    resources = {"GPU": 1} if request.device == "cuda" else None
    by_shard = {shard: part for shard, part in planned.groupby("shard", sort=True)}
    futures = {}
    for name, shard in pending:
        stage = get_stage(name)
        part = by_shard[shard]
        job = ShardJob(
            cache_root=str(cache.root),
            stage=name,
            shard=int(shard),
            images=part[["image_id", "path", "row", "status", "error"]].reset_index(drop=True),
            config=configs[name],
            device=request.device,
            batch_size=request.batch_size,
        )
        needs = [futures[(need, shard)] for need in stage.requires if (need, shard) in futures]
        futures[(name, shard)] = client.submit(
            run_shard,
            job,
            *needs,
            key=f"shnet-{name}-{shard:05d}-{run_token}",
            retries=2,
            pure=False,
            resources=resources if name != "probe" else None,
        )
    owner = {future.key: name_shard for name_shard, future in futures.items()}
    for future in as_completed(list(futures.values())):
        name, shard = owner[future.key]
        tally = tallies[name]
        if future.status == "error":
            exc = future.exception()
            tally.failed.append((name, shard, f"{type(exc).__name__}: {exc}"))
            display.shard_failed(name, shard, exc)
            continue
        summary = future.result()
        tally.shards_done += 1
        tally.images += summary["images"]
        tally.errors += summary.get("errors", 0)
        tally.models_built += int(summary.get("model_built", False))
        if "started_at" in summary:
            tally.first_start = min(summary["started_at"], tally.first_start or summary["started_at"])
            tally.last_finish = max(summary["finished_at"], tally.last_finish or summary["finished_at"])
        display.shard_done(name, summary)


def _write_images_table(cache: Cache, planned: pd.DataFrame) -> None:
    """images.parquet = the plan (current paths) + what the probe found, for every probed shard."""
    frame = planned.copy()
    probed = cache.done_shards("probe")
    if probed:
        found = pd.concat(
            [pd.read_parquet(cache.table_path("probe", s), columns=["image_id", "status", "error", "width", "height"]) for s in probed],
            ignore_index=True,
        ).set_index("image_id")
        hit = frame["image_id"].isin(found.index)
        for column in ("status", "error", "width", "height"):
            frame.loc[hit, column] = found.loc[frame.loc[hit, "image_id"], column].to_numpy()
    atomic_write_parquet(cache.root / IMAGES_TABLE, frame)


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
def dask_client(request: ExtractRequest, num_tasks: int):
    """A client on the embedded LocalCluster, or on the cluster at ``--scheduler``."""
    from dask.distributed import Client, LocalCluster

    if request.device not in ("cpu", "cuda"):
        raise ShnetError(f"--device must be cpu or cuda (got {request.device!r})")
    threads = max(1, request.threads_per_worker)
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
        dashboard_address=None,
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
