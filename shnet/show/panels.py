"""One panel per thing the cache holds for an image, drawn by matplotlib over the picture.

Every panel draws the picture scaled so that its longer side is ``side`` pixels, with data
coordinates in original image pixels: a box (x1, y1, x2, y2) from the cache lands at panel pixels
(x1 * sx, y1 * sy, ...) where ``Panel.scale == (sx, sy)``; the panoptic legend, when present,
sits to the right of the picture. :func:`compose` puts panels side by side under their titles.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ..cache.schema import VOID  # noqa: E402
from .view import ImageView, category_names  # noqa: E402

DPI = 100
SIDE = 640
BOX_WIDTH_PX = 2.0
LEGEND_WIDTH_PX = 230
LEGEND_ROWS = 24
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075")
TITLE_HEIGHT = 26
GAP = 8


@dataclass
class Panel:
    title: str
    rgb: np.ndarray  # [h, w, 3] uint8
    scale: tuple[float, float]  # panel pixels per image pixel, x and y


def category_colour(index: int) -> tuple[float, float, float]:
    """A fixed, well-spread colour per class index (golden-ratio hues, alternating brightness)."""
    hue = (index * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.95 if index % 2 else 0.75)


def category_palette() -> np.ndarray:
    """[256, 3] uint8: a colour per class index; void (255) black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(255):
        palette[index] = np.round(np.array(category_colour(index)) * 255)
    return palette


class _Canvas:
    """A figure whose left part shows the picture at exact pixel scale in image coordinates."""

    def __init__(self, view: ImageView, side: int, extra_width: int = 0, grey: bool = False):
        width, height = view.size
        factor = side / max(width, height)
        self.pixels = (max(1, round(width * factor)), max(1, round(height * factor)))
        self.scale = (self.pixels[0] / width, self.pixels[1] / height)
        total = self.pixels[0] + extra_width
        self.figure = Figure(figsize=(total / DPI, self.pixels[1] / DPI), dpi=DPI)
        FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_axes((0, 0, self.pixels[0] / total, 1))
        picture = np.asarray(Image.fromarray(view.rgb).resize(self.pixels, Image.BILINEAR))
        if grey:
            picture = np.repeat(picture.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
        self.ax.imshow(picture, extent=(0, width, height, 0), interpolation="nearest")
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(height, 0)
        self.ax.set_axis_off()
        self.width, self.height = width, height

    def overlay(self, values: np.ndarray, extent=None, **style) -> None:
        self.ax.imshow(values, extent=extent or (0, self.width, self.height, 0), **style)
        self.ax.set_xlim(0, self.width)
        self.ax.set_ylim(self.height, 0)

    def render(self, title: str) -> Panel:
        self.figure.canvas.draw()
        rgb = np.asarray(self.figure.canvas.buffer_rgba())[..., :3].copy()
        return Panel(title, rgb, self.scale)


def _linewidth(px: float) -> float:
    return px * 72.0 / DPI


def _draw_boxes(canvas: _Canvas, boxes: np.ndarray, labels: list[str] | None, colours: list, widths: list[float] | None = None) -> None:
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        width = widths[i] if widths is not None else BOX_WIDTH_PX
        canvas.ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colours[i], linewidth=_linewidth(width)))
        if labels:
            canvas.ax.text(
                x1, y1, labels[i], fontsize=7, color="white", va="top", ha="left", clip_on=True,
                bbox={"facecolor": colours[i], "alpha": 0.75, "pad": 1.0, "linewidth": 0},
            )


def picture_panel(view: ImageView, side: int = SIDE) -> Panel:
    canvas = _Canvas(view, side)
    notes = [view.image_note] if view.image_note else []
    notes += [f"{stage} failed: {error}" for stage, error in view.failed.items()]
    return canvas.render(f"{view.image_id} ({view.size[0]}x{view.size[1]})" + (" - " + "; ".join(notes) if notes else ""))


def regions_panel(view: ImageView, side: int = SIDE, labels: bool = True) -> Panel:
    regions = view.regions
    canvas = _Canvas(view, side)
    colours = [BOX_COLOURS[i % len(BOX_COLOURS)] for i in range(len(regions.boxes))]
    _draw_boxes(canvas, regions.boxes, [regions.label(i) for i in range(len(regions.boxes))] if labels else None, colours)
    return canvas.render(f"regions: {len(regions.boxes)} boxes")


def pooling_panel(view: ImageView, weights: np.ndarray, side: int = SIDE) -> Panel:
    """Boxes coloured and thickened by the share of the GPO-pooled embedding their tokens carry."""
    import matplotlib.cm as cm

    canvas = _Canvas(view, side, grey=True)
    order = np.argsort(weights)  # the heaviest drawn last, on top
    top = max(float(weights.max()), 1e-12)
    colours = [cm.plasma(float(weights[i]) / top) for i in order]
    widths = [1.0 + 5.0 * float(weights[i]) / top for i in order]
    labels = [f"{100 * weights[i]:.1f}%" for i in order]
    _draw_boxes(canvas, view.regions.boxes[order], labels, colours, widths)
    return canvas.render(f"GPO pooling weight per region (regions carry {100 * weights.sum():.0f}% of the embedding)")


def panoptic_panel(view: ImageView, side: int = SIDE) -> Panel:
    panoptic = view.panoptic
    canvas = _Canvas(view, side, extra_width=LEGEND_WIDTH_PX)
    class_map = panoptic.class_map
    colours = category_palette()[class_map].astype(np.float32) / 255.0
    alpha = np.where(class_map == VOID, 0.0, 0.6)[..., None]
    canvas.overlay(np.concatenate([colours, alpha], axis=-1), interpolation="nearest")
    names = category_names()
    classes, counts = np.unique(class_map[class_map != VOID], return_counts=True)
    ranked = classes[np.argsort(-counts)]
    handles = [Patch(facecolor=category_colour(int(c)), label=names[int(c)] if int(c) < len(names) else f"class {int(c)}") for c in ranked[:LEGEND_ROWS]]
    if len(ranked) > LEGEND_ROWS:
        handles.append(Patch(facecolor="white", label=f"... {len(ranked) - LEGEND_ROWS} more"))
    legend_ax = canvas.figure.add_axes((canvas.pixels[0] / (canvas.pixels[0] + LEGEND_WIDTH_PX), 0, 1 - canvas.pixels[0] / (canvas.pixels[0] + LEGEND_WIDTH_PX), 1))
    legend_ax.set_axis_off()
    if handles:
        legend_ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False)
    else:
        legend_ax.text(0.05, 0.95, "no segment (all void)", va="top", fontsize=8)
    return canvas.render(f"panoptic: {len(classes)} categories, {len(panoptic.segments)} segments")


def saliency_panel(view: ImageView, side: int = SIDE) -> Panel:
    canvas = _Canvas(view, side, grey=True)
    canvas.overlay(view.saliency, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.65, interpolation="bilinear")
    return canvas.render(f"saliency (max {float(view.saliency.max()):.2f})")


def grid_panel(view: ImageView, side: int = SIDE) -> Panel:
    grid = view.grid
    canvas = _Canvas(view, side, grey=True)
    width, height = grid.extent(*view.size)
    canvas.overlay(grid.norm, extent=(0, width, height, 0), cmap="viridis", alpha=0.6, interpolation="nearest")
    return canvas.render(f"grid feature norm ({grid.norm.shape[0]}x{grid.norm.shape[1]} cells, {float(grid.norm.min()):.1f}-{float(grid.norm.max()):.1f})")


def overview_panel(view: ImageView, side: int) -> Panel:
    """What the contact sheet shows: panoptic colours and boxes over the picture (saliency when
    neither exists)."""
    canvas = _Canvas(view, side)
    if view.panoptic is not None:
        class_map = view.panoptic.class_map
        colours = category_palette()[class_map].astype(np.float32) / 255.0
        canvas.overlay(np.concatenate([colours, np.where(class_map == VOID, 0.0, 0.45)[..., None]], axis=-1), interpolation="nearest")
    elif view.saliency is not None and view.regions is None:
        canvas.overlay(view.saliency, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.5, interpolation="bilinear")
    if view.regions is not None:
        _draw_boxes(canvas, view.regions.boxes, None, [BOX_COLOURS[i % len(BOX_COLOURS)] for i in range(len(view.regions.boxes))])
    return canvas.render(view.image_id)


def all_panels(view: ImageView, pooling: np.ndarray | None = None, side: int = SIDE) -> list[Panel]:
    """The picture, then a panel for every stage the cache holds for it (and the pooling weights)."""
    panels = [picture_panel(view, side)]
    if view.regions is not None:
        panels.append(regions_panel(view, side))
    if pooling is not None:
        panels.append(pooling_panel(view, pooling, side))
    if view.panoptic is not None:
        panels.append(panoptic_panel(view, side))
    if view.saliency is not None:
        panels.append(saliency_panel(view, side))
    if view.grid is not None:
        panels.append(grid_panel(view, side))
    return panels


def compose(panels: list[Panel], columns: int = 2) -> tuple[Image.Image, list[tuple[int, int]]]:
    """Panels in rows of ``columns`` under their titles; returns the image and each panel's top-left."""
    rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]
    column_widths = [max(row[c].rgb.shape[1] for row in rows if c < len(row)) for c in range(min(columns, len(panels)))]
    row_heights = [max(p.rgb.shape[0] for p in row) + TITLE_HEIGHT for row in rows]
    sheet = Image.new("RGB", (sum(column_widths) + GAP * (len(column_widths) + 1), sum(row_heights) + GAP * (len(rows) + 1)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=15)
    offsets, y = [], GAP
    for row, row_height in zip(rows, row_heights):
        x = GAP
        for panel, column_width in zip(row, column_widths):
            draw.text((x, y + 4), panel.title, fill="black", font=font)
            sheet.paste(Image.fromarray(panel.rgb), (x, y + TITLE_HEIGHT))
            offsets.append((x, y + TITLE_HEIGHT))
            x += column_width + GAP
        y += row_height + GAP
    return sheet, offsets
