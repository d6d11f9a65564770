"""The ``shnet`` command line: extract, inspect, verify, train, evaluate, import, export, encode, search, show, demo."""

from __future__ import annotations

import ast
import json
import sys
from importlib import import_module, util

import click

from .errors import ShnetError
from .fileio import terminal_safe


# Commands defined in other modules, imported only when run or asked for their own help, so that
# `shnet --help` and the light commands never pay for torch, transformers or dask.distributed.
LAZY_COMMANDS = {
    "train": "shnet.trainer.cli:train_command",
    "evaluate": "shnet.trainer.cli:evaluate_command",
    "import": "shnet.commands.npy_sets:import_command",
    "export": "shnet.commands.npy_sets:export_command",
    "encode": "shnet.retrieval.cli:encode_command",
    "search": "shnet.retrieval.cli:search_command",
    "show": "shnet.show.cli:show_command",
    "demo": "shnet.demo.cli:demo_command",
}


def lazy_short_help(target: str, limit: int = 45) -> str:
    """A lazy command's one-line help, read from its function's docstring in the module's source
    (parsed, not imported); Click shortens it exactly as it does a loaded command's help."""
    module, attr = target.split(":")
    source = util.find_spec(module).origin
    tree = ast.parse(open(source, encoding="utf-8").read(), source)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return click.Command(attr, help=ast.get_docstring(node)).get_short_help_str(limit)
    return load_command(target).get_short_help_str(limit)


def load_command(target: str) -> click.Command:
    module, attr = target.split(":")
    return getattr(import_module(module), attr)


class ShnetGroup(click.Group):
    """Loads the commands of :data:`LAZY_COMMANDS` on first use, and prints a :class:`ShnetError` as
    one message on stderr (exit 1), without a traceback."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, cmd_name):
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            self.add_command(load_command(LAZY_COMMANDS[cmd_name]), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx, formatter):
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = [
            (name, self.commands[name].get_short_help_str(limit) if name in self.commands else lazy_short_help(LAZY_COMMANDS[name], limit))
            for name in self.list_commands(ctx)
            if name in LAZY_COMMANDS or not self.commands[name].hidden
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ShnetError as exc:
            click.secho(f"shnet: error: {terminal_safe(exc, keep_newlines=True)}", fg="red", err=True)
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
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per model call (the regions detector takes them one at a time).")
@click.option("--sample", is_flag=True, help="Extract the small sample image set bundled with shnet.")
@click.option("--refuse-damaged", is_flag=True, help="Stop on a done shard whose files no longer match its done marker (default: redo it).")
def extract(image_dirs, cache, stages, profile, overrides, workers, threads_per_worker, scheduler, device, shard_size, batch_size, sample, refuse_damaged):
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
                console.print(f"  {terminal_safe(row.image_id)}  {terminal_safe(row.error)}  ({terminal_safe(row.path)})", markup=False)
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
    table = Table()
    for column in ("stage", "shards", "ok", "errors", "size", "arrays (per image)"):
        table.add_column(column, no_wrap=column != "arrays (per image)")
    for s in stages:
        arrays = "\n".join(f"{k} {'x'.join(map(str, v['shape'])) or 'scalar'} {v['dtype']}" for k, v in s.arrays.items())
        shards = f"{s.shards_done}/{s.shards_total}" + (f" ({len(s.damaged)} unreadable)" if s.damaged else "")
        table.add_row(s.name, shards, str(s.images_ok), str(s.images_error), _human_bytes(s.bytes_on_disk), arrays)
    console.print(table)
    for s in stages:
        for shard, problem in sorted(s.damaged.items()):
            console.print(f"unreadable: {s.name} shard {shard}: {terminal_safe(problem)}; {store.redo_hint(s.name, shard)}", style="red", markup=False, highlight=False)
    for s in stages:
        if s.config:
            console.print(f"[bold]{s.name}[/bold]: " + "  ".join(f"{k}={_short(v)}" for k, v in s.config.items()), highlight=False)


def _clipped_given_boxes(report) -> int:
    """How many boxes of a regions.boxes file the regions stage clipped to their image."""
    from .cache.store import Cache

    if "regions" not in report.stages:
        return 0
    table = Cache(report.cache).stage_table("regions")
    return int(table["clipped_boxes"].sum()) if "clipped_boxes" in table else 0


def _short(value) -> str:
    """A config value for the terminal: hashes cut to 12 characters (``--json`` keeps them whole)."""
    text = str(value)
    return text[:12] + "..." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


@main.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--quick", is_flag=True, help="Check the sizes done markers vouch for, not the sha256 of every file.")
def verify(cache, quick):
    """Open every shard and check it against its done marker and the tables; exit 1 on any problem."""
    from .cache.inspect import verify_cache
    from .cache.store import Cache

    result = verify_cache(Cache(cache), quick=quick)
    for warning in result.warnings:
        click.echo(f"warning: {terminal_safe(warning)}")
    for problem in result.problems:
        click.secho(f"problem: {terminal_safe(problem)}", fg="red")
    if result.problems:
        raise ShnetError(f"{cache}: {len(result.problems)} problem(s) in {result.checked_shards} checked shard(s)")
    click.echo(f"{cache}: {result.checked_shards} shard(s) verified, no problems.")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
