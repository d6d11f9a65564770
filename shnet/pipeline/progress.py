"""What an extract shows while it runs (a progress bar per stage) and when it ends (a summary)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


class ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} img/s" if speed else "    -- img/s", style="cyan")


class ShardsColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.fields['shards_done']}/{task.fields['shards_total']} shards")


class ExtractDisplay:
    """Rich progress bars, one per stage, advanced by images as shards complete."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = None
        self.tasks = {}

    def start(self, stages, image_counts, tallies) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            ShardsColumn(),
            ImagesPerSecond(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        for name in stages:
            total, skipped = image_counts[name]
            tally = tallies[name]
            self.tasks[name] = self.progress.add_task(
                name, total=total, completed=skipped, shards_done=tally.shards_skipped, shards_total=tally.shards_total
            )
        self.progress.start()

    def shard_done(self, stage: str, summary: dict) -> None:
        task = self.tasks[stage]
        done = self.progress.tasks[task].fields["shards_done"] + 1
        self.progress.update(task, advance=summary["images"], shards_done=done)

    def shard_failed(self, stage: str, shard: int, error: str) -> None:
        self.progress.console.print(f"[red]{stage} shard {shard} failed:[/red] {error}", markup=True, highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def summary_table(report) -> Table:
    table = Table(title=f"shnet extract -> {report.cache}", show_lines=False)
    for column in ("stage", "shards run", "shards skipped", "images", "errors", "img/s", "models built"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for name in report.stages:
        t = report.tallies[name]
        rate = f"{t.images_per_second:.1f}" if t.images_per_second else "-"
        status = f"{t.shards_done}" + (f" ([red]{len(t.failed)} failed[/red])" if t.failed else "")
        table.add_row(name, status, str(t.shards_skipped), str(t.images), str(t.errors), rate, str(t.models_built))
    return table
