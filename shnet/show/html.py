"""Static, self-contained HTML pages: images embedded as data URIs, no script, no network.

The Content-Security-Policy forbids every fetch except embedded images, so a page opened from
disk never reaches out, and looks the same offline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_write_text

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; } .meta { color: #666; font-size: 0.9em; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 260px; }
.card img { max-width: 260px; max-height: 260px; display: block; margin: 0 auto 6px; }
.card .missing { width: 260px; height: 120px; display: flex; align-items: center; justify-content: center; background: #eee; color: #888; }
.card p { margin: 2px 0; font-size: 0.85em; overflow-wrap: anywhere; }
table { border-collapse: collapse; } td, th { padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: left; font-size: 0.9em; }
"""


def escape(text) -> str:
    return html.escape(str(text), quote=True)


def data_uri(rgb: np.ndarray, max_side: int | None = None, quality: int = 85) -> str:
    """An RGB array as an embedded JPEG, shrunk to ``max_side`` when given."""
    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    if max_side is not None:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def write_page(path: str | Path, title: str, body: str) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page(title, body))
    return path
