"""Pure computations on panoptic class maps: the stored map's sampling and the 3SHNet layout inputs.

Class maps hold a COCO panoptic class index (0..132) per pixel and ``VOID`` (255) where no segment is.

How ``seg_map`` stays exact although the layout stage never sees the full-resolution map
--------------------------------------------------------------------------------------------
3SHNet's ``seg_map`` is the full-resolution class map resized to 64x64 by nearest neighbour. We use
the pixel-centre convention (PIL's NEAREST, torch's ``nearest-exact``): output index ``j`` of ``n``
reads source index ``floor((j + 0.5) * size / n)``.

The panoptic stage stores the map at a smaller resolution (longer side ``resolution``), also by
nearest neighbour, but it chooses its sample positions so that the 64-point grid is embedded in
them: along each axis, stored index ``k`` reads the full-resolution index at the centre of its
footprint, except the 64 stored indices ``k_j = floor((j + 0.5) * stored / 64)``, which read exactly
the full-resolution index the 64x64 resize reads for ``j`` (that index lies in the same footprint, up
to rounding, so the stored map is still a nearest-neighbour down-sampling). The layout stage then
takes rows ``k_j`` and columns ``k_j`` of the stored map and gets, bit for bit, the 64x64 nearest-
neighbour resize of the full-resolution map. This needs at least 64 stored samples per axis: the
stored side is never below 64 (or below the full side, when that is smaller, in which case the map
is stored at full resolution along that axis).

The 100-pixel rule of ``cat_onehot`` comes from the segments' full-resolution areas, and
``seg_feat`` (``area``) from the stored map: each 7x7 cell's fraction of stored pixels per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data import coco_panoptic_categories

VOID = 255
NUM_CLASSES = 133
SEG_MAP_SIZE = 64
CELLS = 7
PRESENT_MIN_PIXELS = 100


@dataclass
class PanopticResult:
    """One image's panoptic segmentation, as every backend hands it to the stage.

    ``class_map``: full-resolution [H,W] uint8 class indices (VOID where no segment);
    ``segments``: dicts with segment, category, area, bbox (x,y,w,h), score (full resolution);
    ``probs``: [133,7,7] pooled class probabilities (zeros when the backend has none).
    """

    class_map: np.ndarray
    segments: list
    probs: np.ndarray


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index read by each of ``target`` outputs (pixel-centre nearest neighbour)."""
    return ((2 * np.arange(target, dtype=np.int64) + 1) * source) // (2 * target)


def stored_side(full: int, longer: int, resolution: int) -> int:
    """Stored length of an axis of ``full`` pixels when the longer axis becomes ``resolution``."""
    scaled = max(1, round(full * min(1.0, resolution / longer)))
    return min(full, max(SEG_MAP_SIZE, scaled))


def stored_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) of the stored map of a ``height`` x ``width`` image (longer side ``resolution``)."""
    if resolution < SEG_MAP_SIZE:
        raise ValueError(f"the stored map needs a resolution of at least {SEG_MAP_SIZE}")
    longer = max(height, width)
    return stored_side(height, longer, resolution), stored_side(width, longer, resolution)


def stored_sample_indices(full: int, stored: int) -> np.ndarray:
    """Full-resolution index each stored index reads along one axis, the 64-point grid embedded."""
    indices = nearest_indices(full, stored)
    indices[nearest_indices(stored, SEG_MAP_SIZE)] = nearest_indices(full, SEG_MAP_SIZE)
    return indices


def downsample_for_storage(full_map: np.ndarray, resolution: int) -> np.ndarray:
    """The stored class map of a full-resolution class map (see the module docstring)."""
    height, width = full_map.shape
    stored_h, stored_w = stored_shape(height, width, resolution)
    return full_map[np.ix_(stored_sample_indices(height, stored_h), stored_sample_indices(width, stored_w))]


def seg_map_from_stored(stored_map: np.ndarray) -> np.ndarray:
    """``seg_map`` [64,64]: equal to the nearest-neighbour resize of the full-resolution map."""
    height, width = stored_map.shape
    return stored_map[np.ix_(nearest_indices(height, SEG_MAP_SIZE), nearest_indices(width, SEG_MAP_SIZE))]


def pad_map(class_map: np.ndarray, resolution: int) -> np.ndarray:
    """``class_map`` in the top-left corner of a [resolution, resolution] VOID canvas."""
    canvas = np.full((resolution, resolution), VOID, dtype=np.uint8)
    canvas[: class_map.shape[0], : class_map.shape[1]] = class_map
    return canvas


def cell_bounds(size: int, cells: int = CELLS) -> list[tuple[int, int]]:
    """Adaptive-average-pooling cell bounds along one axis: [floor(i*size/n), ceil((i+1)*size/n))."""
    return [((i * size) // cells, -((-(i + 1) * size) // cells)) for i in range(cells)]


def cell_area_fractions(class_map: np.ndarray, cells: int = CELLS) -> np.ndarray:
    """[133, cells, cells] fraction of each cell's pixels that each class covers (void counts in the
    cell's area, so a cell sums to at most 1): the one-hot class map average-pooled."""
    out = np.zeros((NUM_CLASSES, cells, cells), dtype=np.float32)
    rows, cols = cell_bounds(class_map.shape[0], cells), cell_bounds(class_map.shape[1], cells)
    for a, (y0, y1) in enumerate(rows):
        for b, (x0, x1) in enumerate(cols):
            cell = class_map[y0:y1, x0:x1]
            if cell.size:
                out[:, a, b] = np.bincount(cell.ravel(), minlength=256)[:NUM_CLASSES] / cell.size
    return out


def float16_at_most(values: np.ndarray) -> np.ndarray:
    """``values`` as float16, each rounded toward zero, so that fractions that sum to at most 1 still do."""
    values = np.asarray(values, dtype=np.float32)
    half = values.astype(np.float16)
    above = half.astype(np.float32) > values
    half[above] = np.nextafter(half[above], np.float16(0))
    return half


def present_classes(categories: np.ndarray, areas: np.ndarray, min_pixels: int = PRESENT_MIN_PIXELS) -> np.ndarray:
    """``cat_onehot`` [133] uint8: classes whose segments together cover more than ``min_pixels``."""
    categories = np.asarray(categories, dtype=np.int64)
    total = np.bincount(categories, weights=np.asarray(areas, dtype=np.float64), minlength=NUM_CLASSES)[:NUM_CLASSES]
    return (total > min_pixels).astype(np.uint8)


def box_window(box: np.ndarray, image_hw: tuple[int, int], map_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows/cols [y0, y1) x [x0, x1) of a map (covering the whole image) whose pixel centres lie in an
    image-pixel box; a box smaller than one map pixel gets the pixel holding its centre."""
    sy, sx = map_hw[0] / image_hw[0], map_hw[1] / image_hw[1]
    x1, y1, x2, y2 = (float(v) for v in box)

    def span(lo: float, hi: float, scale: float, size: int) -> tuple[int, int]:
        start = int(np.clip(np.ceil(lo * scale - 0.5), 0, size))
        stop = int(np.clip(np.floor(hi * scale - 0.5) + 1, 0, size))
        if stop <= start:
            start = int(np.clip(np.floor((lo + hi) / 2 * scale), 0, size - 1))
            stop = start + 1
        return start, stop

    y0, y1_ = span(y1, y2, sy, map_hw[0])
    x0, x1_ = span(x1, x2, sx, map_hw[1])
    return y0, y1_, x0, x1_


def box_class_histograms(class_map: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """[K, 133]: fraction of each box's map pixels that each class covers (void counted in the area)."""
    out = np.zeros((len(boxes), NUM_CLASSES), dtype=np.float32)
    for i, box in enumerate(boxes):
        y0, y1, x0, x1 = box_window(box, image_hw, class_map.shape)
        window = class_map[y0:y1, x0:x1]
        out[i] = np.bincount(window.ravel(), minlength=256)[:NUM_CLASSES] / window.size
    return out


def box_mean_saliency(saliency: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """[K]: mean of a saliency map (stretched over the whole image) inside each box."""
    out = np.zeros(len(boxes), dtype=np.float32)
    values = saliency.astype(np.float32)
    for i, box in enumerate(boxes):
        y0, y1, x0, x1 = box_window(box, image_hw, saliency.shape)
        out[i] = values[y0:y1, x0:x1].mean()
    return out


def box_geometry(boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """[K, 7]: x1, y1, x2, y2, w, h normalised by the image width/height, and area / image area."""
    height, width = image_hw
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = boxes[:, 0] / width, boxes[:, 1] / height, boxes[:, 2] / width, boxes[:, 3] / height
    w, h = x2 - x1, y2 - y1
    return np.stack([x1, y1, x2, y2, w, h, w * h], axis=1).astype(np.float32)


def segments_from_id_map(segment_ids: np.ndarray, segment_classes: dict[int, int]) -> tuple[np.ndarray, list[dict]]:
    """A full-resolution class map and per-segment area/bbox from a map of segment ids.

    ``segment_classes`` maps segment id -> class index (0..132) or ``VOID``; ids absent from it
    (e.g. 0 or -1 for unassigned pixels) are void. Returns (class_map uint8, segments), where each
    segment has ``segment``, ``category``, ``area`` and ``bbox`` (x, y, w, h) in full-resolution pixels;
    segments with no pixel or a void class are left out.
    """
    segment_ids = np.asarray(segment_ids, dtype=np.int64)
    kept = {sid: cls for sid, cls in segment_classes.items() if cls != VOID and sid > 0}
    labels = np.zeros(segment_ids.shape, dtype=np.int32)
    class_lut = np.full(len(kept) + 1, VOID, dtype=np.uint8)
    order = sorted(kept)
    if order:
        sorted_ids = np.asarray(order, dtype=np.int64)
        pos = np.searchsorted(sorted_ids, segment_ids)
        pos = np.clip(pos, 0, len(sorted_ids) - 1)
        hit = sorted_ids[pos] == segment_ids
        labels[hit] = pos[hit] + 1
        class_lut[1:] = [kept[sid] for sid in order]
    class_map = class_lut[labels]
    areas = np.bincount(labels.ravel(), minlength=len(order) + 1)
    x0, y0, x1, y1 = label_bounding_boxes(labels, len(order))
    segments = [
        {
            "segment": int(order[label - 1]),
            "category": int(class_lut[label]),
            "area": int(areas[label]),
            "bbox": (int(x0[label]), int(y0[label]), int(x1[label] - x0[label]), int(y1[label] - y0[label])),
        }
        for label in range(1, len(order) + 1)
        if areas[label]
    ]
    return class_map, segments


def label_bounding_boxes(labels: np.ndarray, num_labels: int) -> tuple[np.ndarray, ...]:
    """Per label 0..num_labels of a 2-D label map: (x0, y0, x1, y1), the half-open extent of its
    pixels (undefined for a label without pixels). One pass over row and column projections."""
    present_rows = np.zeros((num_labels + 1, labels.shape[0]), dtype=bool)
    present_cols = np.zeros((num_labels + 1, labels.shape[1]), dtype=bool)
    rows, cols = np.indices(labels.shape, sparse=True)
    present_rows[labels, rows] = True
    present_cols[labels, cols] = True
    y0, y1 = present_rows.argmax(1), labels.shape[0] - present_rows[:, ::-1].argmax(1)
    x0, x1 = present_cols.argmax(1), labels.shape[1] - present_cols[:, ::-1].argmax(1)
    return x0, y0, x1, y1


def category_names() -> list[str]:
    return [c.name for c in coco_panoptic_categories()]


def thing_flags() -> np.ndarray:
    return np.asarray([c.is_thing for c in coco_panoptic_categories()], dtype=bool)
