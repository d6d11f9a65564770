"""The ``shnet`` command line: extract, inspect, verify, train, evaluate, import, export, encode, search, show, demo."""

from __future__ import annotations

import json
import sys

import click

from .errors import ShnetError


class ShnetGroup(click.Group):
    """Prints a :class:`ShnetError` as one message on stderr and exits 1, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ShnetError as exc:
            click.secho(f"shnet: error: {exc}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.secho("shnet: interrupted; everything completed so far is kept (re-run the same command to resume)", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=ShnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shnet")
def main():
    """Image folders to a trained 3SHNet image-sentence retrieval model."""


def _csv(_ctx, _param, value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@main.command()
@click.argument("image_dirs", nargs=-1, type=click.Path(file_okay=False))
@click.option("-o", "--output", "cache", required=True, type=click.Path(file_okay=False), help="Cache directory (created if new, resumed if not).")
@click.option("--stages", callback=_csv, help="Comma-separated stages (default: those in the profile); needed stages are added.")
@click.option("--profile", default="default", show_default=True, help="A shipped profile name or a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE", help="Override a stage option, e.g. grid.weights=/path/resnet152.pth.")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes of the embedded cluster (default: min(cores, 4); GPUs with --device cuda).")
@click.option("--threads-per-worker", default=1, show_default=True, type=click.IntRange(min=1), help="Concurrent tasks per worker.")
@click.option("--scheduler", metavar="ADDRESS", help="Use an existing Dask cluster (tcp://host:8786) instead of the embedded one.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), help="Images per shard (default 1000; fixed when the cache is created).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per model call.")
@click.option("--sample", is_flag=True, help="Extract the small sample image set bundled with shnet.")
def extract(image_dirs, cache, stages, profile, overrides, workers, threads_per_worker, scheduler, device, shard_size, batch_size, sample):
    """Precompute features of every image in IMAGE_DIRS into the shard cache."""
    from rich.console import Console

    from .cache import Cache
    from .pipeline.progress import summary_table
    from .pipeline.runner import ExtractRequest, run_extract

    dirs = list(image_dirs)
    if sample:
        from .data import sample_images_dir

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
    )
    report = run_extract(request)
    console = Console()
    if report.nothing_to_do:
        console.print(f"{report.cache}: every shard of {', '.join(report.stages)} is already complete; nothing to do.")
    else:
        console.print(summary_table(report))
    console.print(f"{report.num_images} images, {report.failed_images} could not be decoded, {report.wall_seconds:.1f}s.")
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


@main.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--image", "image_id", help="Show everything stored for one image_id.")
@click.option("--errors", is_flag=True, help="List the images that could not be decoded.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(cache, image_id, errors, as_json):
    """Show what a cache holds: stages, shards, images, failures, arrays, config."""
    from rich.console import Console
    from rich.table import Table

    from .cache.inspect import describe_image, summarise_cache
    from .cache.store import Cache

    store = Cache(cache)
    console = Console()
    if image_id:
        info = describe_image(store, image_id)
        click.echo(json.dumps(info, indent=2, default=str))
        return
    if errors:
        frame = store.images()
        failed = frame[frame["status"] == "error"][["image_id", "path", "error"]]
        if as_json:
            click.echo(failed.to_json(orient="records", indent=2))
        else:
            console.print(f"{len(failed)} image(s) with errors" + (":" if len(failed) else ""))
            for row in failed.itertuples():
                console.print(f"  {row.image_id}  {row.error}  ({row.path})", markup=False)
        return
    overview, stages = summarise_cache(store)
    if as_json:
        click.echo(json.dumps({"cache": overview, "stages": [s.__dict__ for s in stages]}, indent=2, default=str))
        return
    console.print(
        f"[bold]{overview['cache']}[/bold]  format {overview['format_version']}  {overview['images']} images "
        f"({overview['images_ok']} ok, {overview['images_error']} errors, {overview['images_pending']} not probed)  "
        f"{overview['shards']} shards of {overview['shard_size']}"
    )
    if overview["captions"]:
        console.print("captions: " + ", ".join(f"{split} {count}" for split, count in overview["captions"].items()))
    table = Table(show_lines=True)
    for column in ("stage", "shards", "ok", "errors", "arrays (per image)", "size", "config"):
        table.add_column(column)
    for s in stages:
        arrays = "\n".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in s.arrays.items())
        config = "\n".join(f"{k}={v}" for k, v in s.config.items())
        table.add_row(s.name, f"{s.shards_done}/{s.shards_total}", str(s.images_ok), str(s.images_error), arrays, _human_bytes(s.bytes_on_disk), config)
    console.print(table)


@main.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
def verify(cache):
    """Open every shard and check shapes and row counts against the tables; exit 1 on any problem."""
    from .cache.inspect import verify_cache
    from .cache.store import Cache

    result = verify_cache(Cache(cache))
    for warning in result.warnings:
        click.echo(f"warning: {warning}")
    for problem in result.problems:
        click.secho(f"problem: {problem}", fg="red")
    if result.problems:
        raise ShnetError(f"{cache}: {len(result.problems)} problem(s) in {result.checked_shards} checked shard(s)")
    click.echo(f"{cache}: {result.checked_shards} shard(s) verified, no problems.")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _register_trainer_commands() -> None:
    from .trainer.cli import evaluate_command, train_command

    main.add_command(train_command, "train")
    main.add_command(evaluate_command, "evaluate")


_register_trainer_commands()

from .commands.npy_sets import export_command, import_command  # noqa: E402

main.add_command(import_command, "import")
main.add_command(export_command, "export")

from .retrieval.cli import encode_command, search_command  # noqa: E402

main.add_command(encode_command, "encode")
main.add_command(search_command, "search")

from .show.cli import show_command  # noqa: E402

main.add_command(show_command, "show")

from .demo.cli import demo_command  # noqa: E402

main.add_command(demo_command, "demo")
