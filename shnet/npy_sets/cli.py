"""``shnet import`` and ``shnet export``: options parsed, :mod:`~shnet.npy_sets.importer` and
:mod:`~shnet.npy_sets.exporter` called, their reports printed."""

from __future__ import annotations

import sys

import click

from ..cache.store import Cache
from ..fileio import terminal_safe
from .exporter import captions_split, export_split, imported_split
from .format import DEFAULT_CAPTIONS_PER_IMAGE, DEFAULT_FEATURES_DIR, REGION_LAYOUTS
from .importer import import_sets


def _log(message: str) -> None:
    click.echo(terminal_safe(message, keep_newlines=True), err=True)


def _progress_bar(label: str, total: int):
    return click.progressbar(length=total, label=f"importing {label}", file=sys.stderr, show_pos=True)


@click.command("import")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("-o", "--output", "cache", required=True, type=click.Path(file_okay=False), help="New cache directory.")
@click.option("--split", "splits", multiple=True, help="Import only this split (repeatable; default: every split in FOLDER).")
@click.option(
    "--captions-per-image",
    type=click.IntRange(min=1),
    default=DEFAULT_CAPTIONS_PER_IMAGE,
    show_default=True,
    help="Lines of {split}_caps.txt per image.",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Images per shard of the new cache.")
@click.option(
    "--features-dir",
    metavar="NAME",
    help=f"Folder in FOLDER of per-image region features, NAME/ID.npy per line of {{split}}_ids.txt, read for splits "
    f"without {{split}}_ims.npy (default: {DEFAULT_FEATURES_DIR}, when present).",
)
@click.option("--allow-nonfinite", is_flag=True, help="Import float arrays holding NaN or inf as they are (refused by default).")
def import_command(folder, cache, splits, captions_per_image, shard_size, features_dir, allow_nonfinite) -> None:
    """Import a SCAN/3SHNet precomputed set (FOLDER with {split}_ims.npy, {split}_segmentations.npy,
    {split}_seg_maps.npy, {split}_cat_onehots.npy, {split}_caps.txt, {split}_ids.txt; any subset;
    or, as the published COCO loader reads them, coco_region_features/ID.npy per id instead of
    {split}_ims.npy) into a new cache with stages regions and layout and the captions, ready for
    `shnet train`."""
    report = import_sets(
        folder, cache, splits, captions_per_image, shard_size, log=_log, progress=_progress_bar, features_dir=features_dir, allow_nonfinite=allow_nonfinite
    )
    listing = ", ".join(f"{split} {count}" for split, count in report.splits.items())
    click.echo(
        f"{report.cache}: {report.images} images (splits: {listing}), stages: {', '.join(report.stages) or 'none'}, "
        f"{report.captions} captions"
    )


@click.command("export")
@click.argument("cache", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Folder for the .npy and .txt files.")
@click.option("--split", "splits", multiple=True, required=True, help="Split to export (repeatable).")
@click.option(
    "--captions",
    type=click.Path(dir_okay=False, exists=True),
    help="Karpathy JSON or CSV/Parquet (image_id, caption, split): the split's images, their order and captions "
    "(default for an imported cache: its own).",
)
@click.option(
    "--captions-per-image",
    type=click.IntRange(min=1),
    default=DEFAULT_CAPTIONS_PER_IMAGE,
    show_default=True,
    help="Captions per image in {split}_caps.txt (with --captions).",
)
@click.option(
    "--region-features",
    type=click.Choice(REGION_LAYOUTS),
    help="whole-split: {split}_ims.npy; per-image: one NAME/ID.npy per line ID of {split}_ids.txt, as the published COCO "
    "loader reads them (default: as the split was imported, else whole-split).",
)
@click.option(
    "--features-dir",
    metavar="NAME",
    help=f"Folder of the per-image files in the output (default: as imported, else {DEFAULT_FEATURES_DIR}).",
)
def export_command(cache, out, splits, captions, captions_per_image, region_features, features_dir) -> None:
    """Export splits of CACHE as a SCAN/3SHNet precomputed set: {split}_ims.npy or per-image
    coco_region_features/ID.npy files (stage regions), {split}_segmentations.npy,
    {split}_seg_maps.npy, {split}_cat_onehots.npy (stage layout), {split}_ids.txt and
    {split}_caps.txt, in the caption file's image order."""
    opened = Cache(cache)
    requests = [
        (captions_split(opened, captions, split, captions_per_image) if captions else imported_split(opened, split)).with_region_layout(
            region_features, features_dir
        )
        for split in splits
    ]
    for split, request in zip(splits, requests):
        written = export_split(opened, request, out, log=_log)
        click.echo(f"split '{split}': {len(request.image_ids)} images -> {', '.join(str(p) for p in written)}")
