"""``report.html``: one self-contained page (every image inline as base64, no network) with the
metric table next to chance, the training curves of each run, and, for a few test captions, the
top-5 images the hybrid model retrieves with the correct one marked."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..cache import Cache
from ..fileio import atomic_write_text
from ..cache.captions import CaptionSet
from .metrics_table import MODELS, TABLE_COLUMNS, chance_metrics

THUMBNAIL_SIDE = 112
TOP_K = 5


@dataclass
class RetrievalExample:
    caption: str
    correct: str  # image_id of the caption's own image
    ranked: list[tuple[str, float]]  # the top-k image_ids with their similarity


def retrieval_examples(sims: np.ndarray, captions: CaptionSet, count: int) -> list[RetrievalExample]:
    """Text-to-image top-k (``sims``: images x captions) for ``count`` captions spread evenly over the split."""
    picks = np.linspace(0, len(captions.captions) - 1, num=min(count, len(captions.captions))).round().astype(int)
    examples = []
    for c in picks:
        column = sims[:, c]
        order = np.argsort(-column, kind="stable")[:TOP_K]
        ranked = [(captions.images[i], float(column[i])) for i in order]
        examples.append(RetrievalExample(captions.captions[c], captions.images[captions.caption_image[c]], ranked))
    return examples


def data_uri(path: Path, max_side: int | None = None, fmt: str = "JPEG") -> str:
    """A file's image as a ``data:`` URI (shrunk to ``max_side`` first when given)."""
    image = Image.open(path)
    image.load()
    if max_side:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .note { color: #555; overflow-wrap: anywhere; }
table.metrics { border-collapse: collapse; margin: 1em 0; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
table.metrics td:first-child, table.metrics th:first-child { text-align: left; }
tr.chance td { color: #888; font-style: italic; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.example { margin: 1.2em 0; } .caption { font-weight: 600; margin-bottom: 0.3em; }
.ranked { display: flex; gap: 8px; align-items: flex-start; }
.hit { border: 2px solid #ddd; padding: 3px; text-align: center; font-size: 12px; }
.hit.correct { border-color: #1a9e3a; background: #e8f7ec; }
.hit img { display: block; max-width: 112px; max-height: 112px; margin: 0 auto 2px; }
"""


def metric_table_html(metrics: dict) -> str:
    n_test = metrics["n_test_images"]
    header = "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in TABLE_COLUMNS)
    rows = []
    for model in MODELS:
        result = metrics[model]["full"]
        cells = "".join(f"<td>{result[d][k] if d else result[k]:.1f}</td>" for _, d, k in TABLE_COLUMNS)
        rows.append(f'<tr class="{model}"><td>{model}</td>{cells}</tr>')
    chance = chance_metrics(n_test)
    cells = "".join(f"<td>{chance[d][k] if d else chance[k]:.1f}</td>" for _, d, k in TABLE_COLUMNS)
    rows.append(f'<tr class="chance"><td>chance</td>{cells}</tr>')
    return f'<table class="metrics" id="metrics"><tr><th>model</th>{header}</tr>{"".join(rows)}</table>'


def write_report(
    path: Path,
    metrics: dict,
    curves: dict[str, Path],
    examples: list[RetrievalExample],
    cache: Cache,
    settings_lines: list[str],
) -> Path:
    """Write the page to ``path`` and return it. Image files are found through the cache's
    ``images.parquet`` (image_id -> path)."""
    paths = cache.images().set_index("image_id")["path"].to_dict()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        # Nothing on the page may be fetched: every image is a data: URI, the style is inline.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        "<title>shnet demo report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>shnet demo</h1>",
        "<p class='note'>Synthetic captioned scenes, extracted by every stage with seeded random-initialised "
        "networks (no weights ship with shnet), then a region model, a grid model and their hybrid trained and "
        f"evaluated on the {metrics['n_test_images']} test images (5 captions each).</p>",
        "<ul class='note'>" + "".join(f"<li>{html.escape(line)}</li>" for line in settings_lines) + "</ul>",
        "<h2>Retrieval on the test split</h2>",
        metric_table_html(metrics),
        "<p class='note'>R@K in %: i2t ranks captions for each image, t2i ranks images for each caption; "
        "rSum is the sum of the six recalls; chance is what a random ranking scores.</p>",
        "<h2>Training curves</h2>",
    ]
    for model, curve in curves.items():
        image = f"<img alt='{model} training curves' src='{data_uri(curve, fmt='PNG')}'>"
        parts.append(f"<figure><figcaption>{html.escape(model)} model</figcaption>{image}</figure>")
    parts.append(f"<h2>Text-to-image: the top {TOP_K} images of the hybrid model</h2>")
    parts.append("<p class='note'>The caption's own image is framed in green.</p>")
    for example in examples:
        hits = []
        for rank, (image_id, score) in enumerate(example.ranked, start=1):
            correct = " correct" if image_id == example.correct else ""
            thumbnail = data_uri(Path(paths[image_id]), THUMBNAIL_SIDE)
            hits.append(
                f"<div class='hit{correct}'><img alt='{html.escape(image_id)}' src='{thumbnail}'>"
                f"#{rank} {html.escape(image_id)}<br>{score:.3f}</div>"
            )
        found = any(image_id == example.correct for image_id, _ in example.ranked)
        missing = "" if found else f"<div class='note'>its image {html.escape(example.correct)} is not in the top {TOP_K}</div>"
        parts.append(
            f"<div class='example'><div class='caption'>&ldquo;{html.escape(example.caption)}&rdquo;</div>"
            f"<div class='ranked'>{''.join(hits)}</div>{missing}</div>"
        )
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
    return path
