"""``shnet search --html``: the hits as a static page of thumbnails (embedded) with their paths."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import ImageDecodeError
from ..pipeline.images import decode_image
from ..show.html import data_uri, escape, write_page
from .search import QueryResult

THUMBNAIL_SIDE = 256


def thumbnail(path: str) -> str:
    """An ``<img>`` of the file, or a box saying why there is none."""
    if not path:
        return '<div class="missing">no image file (the cache has no path)</div>'
    try:
        return f'<img src="{data_uri(decode_image(path, draft_size=THUMBNAIL_SIDE), THUMBNAIL_SIDE)}" alt="{escape(path)}">'
    except (ImageDecodeError, OSError) as exc:
        return f'<div class="missing">{escape(exc)}</div>'


def _image_hits(result: QueryResult) -> str:
    cards = []
    for hit in result.hits:
        cards.append(
            f'<div class="card">{thumbnail(hit.fields["path"])}'
            f"<p><b>#{hit.rank}</b> score {hit.score:.4f}</p><p>{escape(hit.fields['image_id'])}</p>"
            f"<p class=\"meta\">{escape(hit.fields['path'])}</p></div>"
        )
    return f"<h2>“{escape(result.query)}”</h2>\n<div class=\"grid\">{''.join(cards)}</div>"


def _caption_hits(result: QueryResult, query_path: str) -> str:
    rows = "".join(
        f"<tr><td>{h.rank}</td><td>{h.score:.4f}</td><td>{escape(h.fields['caption'])}</td>"
        f"<td>{escape(h.fields['image_id'] or h.fields['image'])}{' (this image)' if h.fields['image_id'] == result.query else ''}</td></tr>"
        for h in result.hits
    )
    return (
        f'<h2>{escape(result.query)}</h2><div class="card">{thumbnail(query_path)}<p class="meta">{escape(query_path)}</p></div>'
        f"<table><tr><th>rank</th><th>score</th><th>caption</th><th>its image</th></tr>{rows}</table>"
    )


def write_results(path: str | Path, store_root: Path, results: Sequence[QueryResult], query_path: str = "") -> Path:
    body = f'<p class="meta">embeddings: {escape(store_root)}; {escape(results[0].method)} search</p>\n' if results else ""
    body += "\n".join(_image_hits(r) if r.part == "images" else _caption_hits(r, query_path) for r in results)
    return write_page(path, "shnet search", body)
