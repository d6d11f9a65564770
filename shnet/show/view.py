"""Everything a cache holds for one image, gathered for drawing (the picture itself included)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..cache import Cache, schema
from ..data import coco_panoptic_categories
from ..errors import ImageDecodeError, ShnetError
from ..pipeline.images import decode_image

# Optional root attributes of a regions shard naming its classes (JSON lists, index = class id).
OBJECT_NAME_ATTRS = ("object_names", "object_classes")
ATTRIBUTE_NAME_ATTRS = ("attribute_names", "attr_names", "attribute_classes")


@dataclass
class Regions:
    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2 in original pixels (valid boxes only)
    object_class: np.ndarray | None = None
    object_score: np.ndarray | None = None
    attr_class: np.ndarray | None = None
    attr_score: np.ndarray | None = None
    object_names: list[str] | None = None
    attribute_names: list[str] | None = None

    def label(self, i: int) -> str:
        """``attribute object score`` from whatever the cache holds; ``class N`` without names."""
        parts = []
        if self.attr_class is not None and self.attr_score is not None and self.attr_score[i] > 0:
            parts.append(_name(self.attribute_names, int(self.attr_class[i]), "attr"))
        if self.object_class is not None:
            parts.append(_name(self.object_names, int(self.object_class[i]), "class"))
        if self.object_score is not None:
            parts.append(f"{float(self.object_score[i]):.2f}")
        return " ".join(parts) or f"box {i}"


def _name(names: list[str] | None, index: int, kind: str) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else f"{kind} {index}"


@dataclass
class Panoptic:
    class_map: np.ndarray  # [h, w] class index per pixel (valid area only), 255 = void
    segments: pd.DataFrame  # the image's rows of the segments table (may be empty)


@dataclass
class GridNorm:
    norm: np.ndarray  # [h, w] L2 norm of each valid cell
    columns: int  # cells per row of the full (padded) grid
    resize: str  # stretch | pad
    input_size: int

    def extent(self, width: int, height: int) -> tuple[float, float]:
        """Width and height, in image pixels, that the valid cells cover (``pad`` puts the image
        top-left in the square input; the last cells may reach past its edge)."""
        if self.resize != "pad" or not self.input_size:
            return float(width), float(height)
        cell = (self.input_size / self.columns) * max(width, height) / self.input_size
        return self.norm.shape[1] * cell, self.norm.shape[0] * cell


@dataclass
class ImageView:
    image_id: str
    path: str
    rgb: np.ndarray  # [H, W, 3] uint8, upright; a grey canvas when the file cannot be read
    image_note: str  # why the picture is a canvas ("" when it is the image)
    regions: Regions | None = None
    panoptic: Panoptic | None = None
    saliency: np.ndarray | None = None  # [r, r] in [0, 1], stretched over the whole image
    grid: GridNorm | None = None
    stages: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # stage -> its error for this image

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        return self.rgb.shape[1], self.rgb.shape[0]


def _attr_list(attrs, keys) -> list[str] | None:
    for key in keys:
        if key in attrs:
            value = attrs[key]
            return [str(v) for v in (json.loads(value) if isinstance(value, str) else value)]
    return None


def read_view(cache: Cache, image_id: str, images: pd.DataFrame | None = None) -> ImageView:
    """The picture and every complete stage's arrays for ``image_id``."""
    images = cache.images().set_index("image_id") if images is None else images
    if image_id not in images.index:
        raise ShnetError(f"no image '{image_id}' in {cache.root}; list them with pd.read_parquet('{cache.root}/images.parquet')")
    info = images.loc[image_id]
    if info["status"] == "error":
        raise ShnetError(f"{image_id} could not be decoded when it was extracted: {info['error']} ({info['path']})")
    shard, row = int(info["shard"]), int(info["row"])
    arrays: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for stage in (schema.REGIONS, schema.PANOPTIC, schema.SALIENCY, schema.GRID):
        if cache.is_done(stage, shard):
            status = cache.shard_table(stage, shard).set_index("row").loc[row]
            if status["status"] != "ok":
                failed[stage] = str(status["error"]) or str(status["status"])
                continue
            with cache.open_arrays(stage, shard) as h5:
                arrays[stage] = {name: h5[name][row] for name in h5}
                arrays[stage]["_attrs"] = dict(h5.attrs)
    rgb, note = _picture(str(info["path"]), info, arrays)
    view = ImageView(image_id, str(info["path"]), rgb, note, stages=sorted(arrays), failed=failed)
    if schema.REGIONS in arrays:
        view.regions = _regions(arrays[schema.REGIONS])
    if schema.PANOPTIC in arrays:
        view.panoptic = _panoptic(cache, arrays[schema.PANOPTIC], image_id, shard)
    if schema.SALIENCY in arrays:
        view.saliency = arrays[schema.SALIENCY][schema.SALIENCY_MAP].astype(np.float32)
    if schema.GRID in arrays:
        view.grid = _grid(cache, arrays[schema.GRID])
    return view


def _picture(path: str, info, arrays) -> tuple[np.ndarray, str]:
    """The decoded image, or a grey canvas of the size the cache records."""
    if path:
        try:
            return decode_image(path), ""
        except (ImageDecodeError, OSError) as exc:
            note = f"image not readable: {exc}"
    else:
        note = "the cache records no image file"
    height, width = int(info.get("height", -1)), int(info.get("width", -1))
    if (height <= 0 or width <= 0) and schema.REGIONS in arrays:
        height, width = (int(v) for v in arrays[schema.REGIONS][schema.IMAGE_HW])
    if height <= 0 or width <= 0:
        height = width = 256
    return np.full((height, width, 3), 200, dtype=np.uint8), note


def _regions(a: dict) -> Regions:
    n = a[schema.NUM_BOXES]
    names = (schema.OBJECT_CLASS, schema.OBJECT_SCORE, schema.ATTR_CLASS, schema.ATTR_SCORE)
    optional = {k: schema.valid_rows(a[k], n) for k in names if k in a}
    return Regions(
        boxes=schema.valid_rows(a[schema.BOXES], n).astype(np.float32),
        object_names=_attr_list(a["_attrs"], OBJECT_NAME_ATTRS),
        attribute_names=_attr_list(a["_attrs"], ATTRIBUTE_NAME_ATTRS),
        **optional,
    )


def _panoptic(cache: Cache, a: dict, image_id: str, shard: int) -> Panoptic:
    segments_path = cache.table_path(schema.PANOPTIC, shard, "segments")
    segments = pd.read_parquet(segments_path) if segments_path.exists() else pd.DataFrame(columns=["image_id"])
    return Panoptic(schema.valid_area(a[schema.CLASS_MAP], a[schema.MAP_HW]), segments[segments["image_id"] == image_id].reset_index(drop=True))


def _grid(cache: Cache, a: dict) -> GridNorm:
    config = cache.stage_config(schema.GRID) or {}
    norm = np.linalg.norm(schema.valid_area(a[schema.GRID_FEATURES], a[schema.VALID_HW]).astype(np.float32), axis=-1)
    return GridNorm(norm, int(a[schema.GRID_FEATURES].shape[1]), str(config.get("resize", "stretch")), int(config.get("input_size", 0)))


def category_names() -> list[str]:
    return [c.name for c in coco_panoptic_categories()]
