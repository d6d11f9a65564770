"""``shnet inspect`` and ``shnet verify``: what a cache holds and whether its shards match their done
markers. Torch-free and cheap to import: these are the commands a user runs first."""

from __future__ import annotations

import json

import click

from ..errors import ShnetError
from ..fileio import terminal_safe


@click.command("inspect")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--image", "image_id", help="Show everything stored for one image_id.")
@click.option("--errors", is_flag=True, help="List the images that could not be decoded.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_command(cache, image_id, errors, as_json):
    """Show what a cache holds: stages, shards, images, failures, arrays, config."""
    from rich.console import Console
    from rich.table import Table

    from .inspect import describe_image, summarise_cache
    from .store import Cache

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


@click.command("verify")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--quick", is_flag=True, help="Check the sizes done markers vouch for, not the sha256 of every file.")
def verify_command(cache, quick):
    """Open every shard and check it against its done marker and the tables; exit 1 on any problem."""
    from .inspect import verify_cache
    from .store import Cache

    result = verify_cache(Cache(cache), quick=quick)
    for warning in result.warnings:
        click.echo(f"warning: {terminal_safe(warning)}")
    for problem in result.problems:
        click.secho(f"problem: {terminal_safe(problem)}", fg="red")
    if result.problems:
        raise ShnetError(f"{cache}: {len(result.problems)} problem(s) in {result.checked_shards} checked shard(s)")
    click.echo(f"{cache}: {result.checked_shards} shard(s) verified, no problems.")


def _short(value) -> str:
    """A config value for the terminal: hashes cut to 12 characters (``--json`` keeps them whole)."""
    text = str(value)
    return text[:12] + "..." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
