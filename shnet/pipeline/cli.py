"""``shnet extract``: options parsed into an :class:`~shnet.pipeline.runner.ExtractRequest`, the run's
summary printed. The runner (and with it Dask) is imported only when the command runs."""

from __future__ import annotations

import click

from ..devices import DEVICE_HELP, DEVICE_METAVAR, device_option_callback
from ..errors import ShnetError


def _csv(_ctx, _param, value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command("extract")
@click.argument("image_dirs", nargs=-1, type=click.Path(file_okay=False))
@click.option("-o", "--output", "cache", required=True, type=click.Path(file_okay=False), help="Cache directory (created if new, resumed if not).")
@click.option("--stages", callback=_csv, help="Comma-separated stages (default: those in the profile); needed stages are added.")
@click.option("--profile", default="default", show_default=True, help="A shipped profile name or a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE", help="Override a stage option, e.g. grid.weights=/path/resnet152.pth.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the embedded cluster (default: min(cores, 4); the GPU count on CUDA).")
@click.option("--threads-per-worker", default=1, show_default=True, type=click.IntRange(min=1), help="Concurrent tasks per worker.")
@click.option("--scheduler", metavar="ADDRESS|in-process", help="Run the tasks on an existing Dask cluster (tcp://host:8786) instead of the embedded one; or `in-process`: one after another in this process, no cluster (small image sets, debugging).")
@click.option("--device", default="cpu", show_default=True, metavar=DEVICE_METAVAR, callback=device_option_callback, help=f"{DEVICE_HELP}; cuda: one GPU per worker process, fp16 autocast; cuda:N is refused (run with CUDA_VISIBLE_DEVICES=N and --device cuda).")
@click.option("--shard-size", type=click.IntRange(min=1), help="Images per shard (default 1000; fixed when the cache is created).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per model call (the regions detector takes them one at a time).")
@click.option("--sample", is_flag=True, help="Extract the small sample image set bundled with shnet.")
@click.option("--refuse-damaged", is_flag=True, help="Stop on a done shard whose files no longer match its done marker (default: redo it).")
def extract_command(image_dirs, cache, stages, profile, overrides, workers, threads_per_worker, scheduler, device, shard_size, batch_size, sample, refuse_damaged):
    """Precompute features of every image in IMAGE_DIRS into the shard cache."""
    from rich.console import Console

    from ..cache import Cache
    from .progress import summary_table
    from .runner import ExtractRequest, run_extract

    dirs = list(image_dirs)
    if sample:
        from ..data import sample_images_dir

        dirs.append(str(sample_images_dir()))
    if not dirs:
        raise ShnetError("give at least one IMAGE_DIR (or --sample for the bundled sample images)")
    request = ExtractRequest(
        image_dirs=dirs,
        cache=cache,
        stages=stages,
        profile=profile,
        overrides=list(overrides),
        workers=workers,
        threads_per_worker=threads_per_worker,
        scheduler=scheduler,
        device=device,
        shard_size=shard_size,
        batch_size=batch_size,
        refuse_damaged=refuse_damaged,
    )
    report = run_extract(request)
    console = Console()
    for stage, shard, problem in report.redone:
        console.print(f"{stage} shard {shard} was damaged ({problem}); redone.", markup=False, highlight=False)
    if report.nothing_to_do:
        console.print(f"{report.cache}: every shard of {', '.join(report.stages)} is already complete; nothing to do.")
    else:
        console.print(summary_table(report))
    console.print(f"{report.num_images} images, {report.failed_images} could not be decoded, {report.wall_seconds:.1f}s.")
    clipped = _clipped_given_boxes(report)
    if clipped:
        console.print(f"{clipped} given box(es) reached past their image and were clipped to it (per image: clipped_boxes in {report.cache}/regions/table).")
    if report.failed_images:
        console.print(
            f"See the failures with `shnet inspect {report.cache} --errors` or "
            f"pd.read_parquet('{report.cache}/images.parquet').query(\"status == 'error'\")."
        )
    if report.failed_shards:
        lines = "\n".join(f"  {stage} shard {shard}: {error}" for stage, shard, error in report.failed_shards)
        raise ShnetError(
            f"{len(report.failed_shards)} shard(s) failed (completed shards are kept; re-run to retry):\n{lines}\n"
            f"Full tracebacks: {Cache.error_log_path(report.cache)}"
        )


def _clipped_given_boxes(report) -> int:
    """How many boxes of a regions.boxes file the regions stage clipped to their image."""
    from ..cache.store import Cache

    if "regions" not in report.stages:
        return 0
    table = Cache(report.cache).stage_table("regions")
    return int(table["clipped_boxes"].sum()) if "clipped_boxes" in table else 0
