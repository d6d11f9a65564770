"""Pure computations on panoptic class maps: the stored map's sampling and the 3SHNet layout inputs.

Class maps hold a class index (0..132) per pixel and ``VOID`` (255) where no segment is.

How ``seg_map`` stays exact although the layout stage never sees the full-resolution map
--------------------------------------------------------------------------------------------
3SHNet's ``seg_map`` is the full-resolution class map resized to 64x64 by nearest neighbour. The
only published code that builds it (3SHNet's early loader) calls
``cv2.resize(map, None, fx=64/w, fy=64/h, interpolation=cv2.INTER_NEAREST)``, whose output index
``j`` reads source index ``floor(j * (1 / (64 / w)))`` in double precision (the top-left convention;
with the float rounding it is not always the exact ``j * w // 64``). That is the default sampling,
``opencv``; ``centre`` reads ``floor((j + 0.5) * w / 64)`` (PIL's NEAREST, OpenCV's
INTER_NEAREST_EXACT), the convention of caches made before.

The panoptic stage stores the map at a smaller resolution (longer side ``resolution``), also by
nearest neighbour, but it chooses its sample positions so that the 64-point grid is embedded in
them: along each axis, stored index ``k`` reads the full-resolution index at the centre of its
footprint, except 64 stored indices ``k_j`` (``embedded_positions``), which read exactly the
full-resolution index the 64x64 resize reads for ``j`` (that index lies in the footprint of ``k_j``,
up to rounding, so the stored map is still a nearest-neighbour down-sampling). The layout stage then
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

from ..cache.schema import NUM_CLASSES, SEG_CELLS, SEG_MAP_SIZE, VOID
from ..data import coco_panoptic_categories

PRESENT_MIN_PIXELS = 100


@dataclass
class PanopticResult:
    """One image's panoptic segmentation, as every backend hands it to the stage.

    ``class_map``: full-resolution [H,W] uint8 class indices (VOID where no segment);
    ``segments``: dicts with segment, category, area, bbox (x,y,w,h), score (full resolution);
    ``probs``: [133,7,7] pooled class probabilities (zeros when the backend has none);
    ``class_probs``: [133,h,w] per-pixel class probabilities over the whole image at the backend's
    own resolution, or None when the backend has none (annotations, detectron2).
    """

    class_map: np.ndarray
    segments: list
    probs: np.ndarray
    class_probs: np.ndarray | None = None


SAMPLINGS = ("opencv", "centre")  # how seg_map samples the full-resolution map (see above)
CLASS_ORDERS = ("coco", "upsnet")  # COCO panoptic (things first) or UPSNet (stuff first)


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index read by each of ``target`` outputs (pixel-centre nearest neighbour)."""
    return ((2 * np.arange(target, dtype=np.int64) + 1) * source) // (2 * target)


def opencv_nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index read by each of ``target`` outputs of ``cv2.resize(..., fx=target/source,
    interpolation=cv2.INTER_NEAREST)``: ``floor(j * (1 / fx))`` with OpenCV's double arithmetic."""
    step = 1.0 / (target / source)
    return np.minimum(np.floor(np.arange(target, dtype=np.float64) * step).astype(np.int64), source - 1)


def seg_map_indices(source: int, sampling: str) -> np.ndarray:
    """The ``SEG_MAP_SIZE`` source indices the 64x64 ``seg_map`` reads along an axis of ``source``."""
    if sampling == "opencv":
        return opencv_nearest_indices(source, SEG_MAP_SIZE)
    if sampling == "centre":
        return nearest_indices(source, SEG_MAP_SIZE)
    raise ValueError(f"seg_map sampling must be one of {SAMPLINGS}, got {sampling!r}")


def embedded_positions(stored: int, sampling: str) -> np.ndarray:
    """The stored indices (strictly increasing) that hold the 64 ``seg_map`` samples: the stored index
    whose footprint contains the full-resolution position each sample reads."""
    if sampling == "opencv":
        return (np.arange(SEG_MAP_SIZE, dtype=np.int64) * stored) // SEG_MAP_SIZE
    return seg_map_indices(stored, sampling)


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


def stored_sample_indices(full: int, stored: int, sampling: str) -> np.ndarray:
    """Full-resolution index each stored index reads along one axis, the 64-point grid embedded."""
    indices = nearest_indices(full, stored)
    indices[embedded_positions(stored, sampling)] = seg_map_indices(full, sampling)
    return indices


def downsample_for_storage(full_map: np.ndarray, resolution: int, sampling: str) -> np.ndarray:
    """The stored class map of a full-resolution class map (see the module docstring)."""
    height, width = full_map.shape
    stored_h, stored_w = stored_shape(height, width, resolution)
    return full_map[np.ix_(stored_sample_indices(height, stored_h, sampling), stored_sample_indices(width, stored_w, sampling))]


def seg_map_from_stored(stored_map: np.ndarray, sampling: str) -> np.ndarray:
    """``seg_map`` [64,64]: equal to the nearest-neighbour resize of the full-resolution map."""
    height, width = stored_map.shape
    return stored_map[np.ix_(embedded_positions(height, sampling), embedded_positions(width, sampling))]


def stored_most_probable(class_probs: np.ndarray, full_hw: tuple[int, int], resolution: int, sampling: str) -> np.ndarray:
    """The most probable class at each stored pixel, from a per-pixel class probability volume
    [133, h, w] that covers the whole image at the backend's resolution: the volume is sampled
    bilinearly (half-pixel centres, edges clamped, as ``F.interpolate(..., "bilinear")``) at the
    full-resolution pixels the stored map reads, then the argmax over classes is taken.

    Bilinear weights are non-negative, so where the (up to) four volume pixels a stored pixel reads
    all have the same most probable class, that class is the most probable one of their blend too:
    such pixels take it directly, and the class vectors are blended (rows, then columns) only at the
    others, the pixels near a change of class."""
    height, width = full_hw
    stored_h, stored_w = stored_shape(height, width, resolution)
    rows = bilinear_taps(class_probs.shape[1], height, stored_sample_indices(height, stored_h, sampling))
    cols = bilinear_taps(class_probs.shape[2], width, stored_sample_indices(width, stored_w, sampling))
    volume = np.ascontiguousarray(np.moveaxis(class_probs, 0, -1), dtype=np.float32)  # [h, w, classes]
    best = volume.argmax(-1)
    top, bottom, left, right = rows.low[:, None], rows.high[:, None], cols.low[None, :], cols.high[None, :]
    out = best[top, left]
    mixed_y, mixed_x = np.nonzero((best[top, right] != out) | (best[bottom, left] != out) | (best[bottom, right] != out))
    for start in range(0, len(mixed_y), BLEND_CHUNK):
        y, x = mixed_y[start : start + BLEND_CHUNK], mixed_x[start : start + BLEND_CHUNK]
        upper, lower = rows.low_weight[y, None], rows.high_weight[y, None]
        at_left = volume[rows.low[y], cols.low[x]] * upper + volume[rows.high[y], cols.low[x]] * lower
        at_right = volume[rows.low[y], cols.high[x]] * upper + volume[rows.high[y], cols.high[x]] * lower
        out[y, x] = (at_left * cols.low_weight[x, None] + at_right * cols.high_weight[x, None]).argmax(-1)
    return out.astype(np.uint8)


BLEND_CHUNK = 16384  # stored pixels blended at once (bounds the temporaries at large resolutions)


@dataclass
class BilinearTaps:
    """Along one axis: the two source samples each position reads and their weights (float32)."""

    low: np.ndarray
    high: np.ndarray
    low_weight: np.ndarray
    high_weight: np.ndarray


def bilinear_taps(source: int, full: int, positions: np.ndarray) -> BilinearTaps:
    """Linear interpolation of an axis of ``source`` samples that spans ``full`` pixels, at the
    centres of full-resolution pixels ``positions``."""
    coords = np.clip((positions.astype(np.float64) + 0.5) * source / full - 0.5, 0, source - 1)
    low = np.floor(coords).astype(np.int64)
    frac = coords - low
    return BilinearTaps(low, np.minimum(low + 1, source - 1), (1 - frac).astype(np.float32), frac.astype(np.float32))


def fill_void(class_map: np.ndarray, most_probable: np.ndarray | None = None) -> np.ndarray:
    """``class_map`` without void: a void pixel takes the backend's most probable class there when
    ``most_probable`` gives one (not VOID), else the class of the nearest labelled pixel (OpenCV's
    5x5 chamfer approximation of the Euclidean distance). A map with no labelled pixel stays void."""
    filled = class_map.copy()
    if most_probable is not None:
        use = (filled == VOID) & (most_probable != VOID)
        filled[use] = most_probable[use]
    void = filled == VOID
    if not void.any() or void.all():
        return filled
    import cv2

    _, labels = cv2.distanceTransformWithLabels(void.astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    label_class = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    label_class[labels[~void]] = filled[~void]
    filled[void] = label_class[labels[void]]
    return filled


def class_order_lut(order: str) -> np.ndarray:
    """[256] uint8: COCO panoptic class index (things first) -> its index in ``order``; VOID stays VOID.

    ``upsnet`` is UPSNet's stuff-first order: COCO index i < 80 (thing) -> 53 + i, 80 + j (stuff) -> j."""
    lut = np.arange(256, dtype=np.int64)
    if order == "upsnet":
        things = thing_flags()
        lut[:NUM_CLASSES] = np.where(things, np.cumsum(things) - 1 + int((~things).sum()), np.cumsum(~things) - 1)
    elif order != "coco":
        raise ValueError(f"class order must be one of {CLASS_ORDERS}, got {order!r}")
    return lut.astype(np.uint8)


def pad_map(class_map: np.ndarray, resolution: int) -> np.ndarray:
    """``class_map`` in the top-left corner of a [resolution, resolution] VOID canvas."""
    canvas = np.full((resolution, resolution), VOID, dtype=np.uint8)
    canvas[: class_map.shape[0], : class_map.shape[1]] = class_map
    return canvas


def cell_bounds(size: int, cells: int = SEG_CELLS) -> list[tuple[int, int]]:
    """Adaptive-average-pooling cell bounds along one axis: [floor(i*size/n), ceil((i+1)*size/n))."""
    return [((i * size) // cells, -((-(i + 1) * size) // cells)) for i in range(cells)]


def cell_area_fractions(class_map: np.ndarray, cells: int = SEG_CELLS) -> np.ndarray:
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
