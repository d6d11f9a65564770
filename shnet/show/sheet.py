"""``shnet show CACHE IMAGE_ID`` (one composed panel image) and ``shnet show CACHE --sample N``
(a static HTML contact sheet: embedded thumbnails with overlays, each linking to its full panel
image written next to the page in ``<page>_files/``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..cache import Cache
from ..errors import ShnetError
from .html import data_uri, escape, write_page
from .panels import all_panels, compose, overview_panel
from .view import read_view

THUMBNAIL_SIDE = 240


def show_image(cache_root: str | Path, image_id: str, output: str | Path, run: str | None = None, bert_path: str | None = None) -> Path:
    """Write the panels of one image to ``output`` (PNG, or any format Pillow writes)."""
    cache = Cache(cache_root)
    view = read_view(cache, image_id)
    pooling = None
    if run is not None:
        if view.regions is None:
            raise ShnetError(f"--run shows pooling weights over regions, and {cache.root} has no regions for {image_id}")
        from .pooling import region_pooling_weights

        pooling = region_pooling_weights(run, cache.root, image_id, bert_path)
    image, _ = compose(all_panels(view, pooling))
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    return output


def file_name(image_id: str) -> str:
    """A file name for an image_id (which may hold folders and odd characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"


def contact_sheet(cache_root: str | Path, output: str | Path, sample: int, seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """A static page of ``sample`` randomly chosen decodable images (all of them when fewer)."""
    if sample < 1:
        raise ShnetError(f"--sample must be at least 1 (got {sample})")
    cache = Cache(cache_root)
    images = cache.images()
    ok = images[images["status"] == "ok"]
    if ok.empty:
        raise ShnetError(f"{cache.root} has no image with status ok to show")
    chosen = ok.iloc[np.sort(np.random.default_rng(seed).choice(len(ok), size=min(sample, len(ok)), replace=False))]
    output = Path(output).expanduser()
    folder = output.with_name(output.stem + "_files")
    folder.mkdir(parents=True, exist_ok=True)
    indexed = images.set_index("image_id")
    cards = []
    for n, image_id in enumerate(chosen["image_id"]):
        view = read_view(cache, image_id, indexed)
        full = folder / f"{n:04d}-{file_name(image_id)}.png"
        compose(all_panels(view))[0].save(full)
        thumbnail = overview_panel(view, THUMBNAIL_SIDE)
        details = ", ".join(view.stages) or "no stage"
        cards.append(
            f'<div class="card"><a href="{escape(folder.name + "/" + full.name)}"><img src="{data_uri(thumbnail.rgb)}" alt="{escape(image_id)}"></a>'
            f"<p><b>{escape(image_id)}</b></p><p class=\"meta\">{escape(details)}"
            + (f"; {view.regions.boxes.shape[0]} boxes" if view.regions is not None else "")
            + (f"; {len(view.panoptic.segments)} segments" if view.panoptic is not None else "")
            + (f"; failed: {escape(', '.join(view.failed))}" if view.failed else "")
            + f"</p><p class=\"meta\">{escape(view.path or view.image_note)}</p></div>"
        )
        log(f"{n + 1}/{len(chosen)} {image_id}")
    body = (
        f'<p class="meta">{escape(cache.root)}: {len(chosen)} of {len(ok)} images (seed {seed}); stages '
        f"{escape(', '.join(cache.recorded_stages()))}. Click a thumbnail for its full panels.</p>\n"
        f'<div class="grid">{"".join(cards)}</div>'
    )
    return write_page(output, f"shnet contact sheet: {cache.root.name}", body)
