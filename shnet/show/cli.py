"""``shnet show`` (registered in the main CLI group)."""

from __future__ import annotations

import click

from ..errors import ShnetError
from ..fileio import terminal_safe, writable_destination


@click.command("show")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.argument("image_id", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Panel image (IMAGE_ID; default IMAGE_ID.png) or HTML page (--sample; default sheet.html).")
@click.option("--sample", type=int, help="A contact sheet of this many randomly chosen images instead of one image.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images --sample picks.")
@click.option("--run", type=click.Path(exists=True), help="A region-model run: add its GPO pooling weight per region.")
@click.option("--bert-path", type=click.Path(file_okay=False), help="Local bert-base-uncased folder (for reference checkpoints).")
def show_command(cache, image_id, output, sample, seed, run, bert_path):
    """Draw what CACHE holds for IMAGE_ID in panels (region boxes and labels, panoptic map and legend,
    saliency, grid feature norm), or a static HTML contact sheet of --sample N images."""
    from .sheet import contact_sheet, file_name, show_image

    if (image_id is None) == (sample is None):
        raise ShnetError("give one IMAGE_ID, or --sample N for a contact sheet")
    if output:
        writable_destination(output, "-o")
    if sample is not None:
        if run:
            raise ShnetError("--run draws pooling weights for one IMAGE_ID, not on a contact sheet")
        page = contact_sheet(cache, output or "sheet.html", sample, seed, log=lambda m: click.echo(terminal_safe(m, keep_newlines=True), err=True))
        click.echo(f"contact sheet written to {page} (full panels in {page.stem}_files/)")
    else:
        click.echo(f"panels written to {show_image(cache, image_id, output or file_name(image_id) + '.png', run, bert_path)}")
