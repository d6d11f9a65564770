"""``shnet demo`` (registered in the main CLI group as ``demo_command``)."""

from __future__ import annotations

import sys

import click

from .options import DEFAULT_EPOCHS, DEFAULT_IMAGES, DemoOptions


def _log(message: str) -> None:
    click.echo(message, err=True)


def _show_extract(report) -> None:
    from rich.console import Console

    from ..pipeline.progress import summary_table

    console = Console(stderr=True)
    if report.nothing_to_do:
        console.print(f"{report.cache}: every shard is already complete; nothing to extract.")
    else:
        console.print(summary_table(report))


@click.command("demo")
@click.option(
    "-o", "--output", default="shnet-demo", show_default=True, type=click.Path(file_okay=False), help="Demo directory (resumed if it exists)."
)
@click.option(
    "--images",
    default=DEFAULT_IMAGES,
    show_default=True,
    type=click.IntRange(min=20),
    help="Synthetic scenes to generate (80% train, 10% val, 10% test).",
)
@click.option("--epochs", default=DEFAULT_EPOCHS, show_default=True, type=click.IntRange(min=1), help="Training epochs of each model.")
@click.option("--seed", default=0, show_default=True, help="Seed of the scenes and of the training runs.")
@click.option("--workers", type=click.IntRange(min=1), help="Extraction worker processes (default: as shnet extract).")
@click.option("--progress/--no-progress", default=None, help="Show progress bars while training (default: when stderr is a terminal).")
def demo_command(output, images, epochs, seed, workers, progress) -> None:
    """Synthetic captioned scenes -> every extraction stage -> region, grid and hybrid models trained and
    evaluated, with metrics.json and a self-contained report.html in OUTPUT; a re-run resumes."""
    from .run import run_demo, summary

    if progress is None:
        progress = sys.stderr.isatty()
    options = DemoOptions(output=output, images=images, epochs=epochs, seed=seed, workers=workers, progress=progress)
    result = run_demo(options, log=_log, show_extract=_show_extract)
    click.echo(summary(result))
