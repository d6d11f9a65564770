"""The cache schema: every stage's name and per-image arrays, the label-set constants, and the
valid-rows rule, defined once for the pipeline (which writes them) and the trainer, ``show`` and
``verify`` (which read them). Numpy only: the trainer imports it without the pipeline.

An array's per-image shape is written with the fixed sizes below and with symbols for sizes a
stage's options or model decide (``K`` region slots, ``D`` region feature channels, ``G`` grid
cells per side, ``C`` grid channels, ``S`` saliency side, ``R`` stored panoptic map side). A
symbol takes one value across a stage's arrays in a shard (one K for features, boxes, classes...).

Padded arrays: an image's rows past its companion count are padding (zeros) and never read. The
companion is ``regions/num_boxes`` for the region arrays (the layout stage's per-region arrays
included), ``grid/valid_hw`` (rows, columns) for the grid, ``panoptic/map_hw`` for the stored maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

# --- stages --------------------------------------------------------------------------------------
PROBE = "probe"
GRID = "grid"
SALIENCY = "saliency"
REGIONS = "regions"
PANOPTIC = "panoptic"
LAYOUT = "layout"

# --- the label set and fixed sizes ---------------------------------------------------------------
NUM_CLASSES = 133  # COCO panoptic classes (80 things, 53 stuff)
VOID = 255  # class id of a pixel no segment covers (and of map padding)
SEG_MAP_SIZE = 64  # side of layout/seg_map
SEG_CELLS = 7  # cells per side of layout/seg_feat and panoptic/probs
REGION_FEATURE_DIM = 2048  # channels of a bottom-up-attention region feature
BOX_COORDS = 4  # x1, y1, x2, y2 in original image pixels
GEOMETRY_DIM = 7  # x1, y1, x2, y2, w, h, area, normalised by the image size
HW = 2  # (height, width) pairs

# --- symbolic sizes ------------------------------------------------------------------------------
K = "K"  # region slots per image
D = "D"  # region feature channels
G = "G"  # grid cells per side
C = "C"  # grid channels
S = "S"  # saliency map side
R = "R"  # stored panoptic map side

# --- array names ---------------------------------------------------------------------------------
SIZE = "size"
GRID_FEATURES = "grid"
VALID_HW = "valid_hw"
SALIENCY_MAP = "saliency"
FEATURES = "features"
BOXES = "boxes"
NUM_BOXES = "num_boxes"
OBJECT_CLASS = "object_class"
OBJECT_SCORE = "object_score"
ATTR_CLASS = "attr_class"
ATTR_SCORE = "attr_score"
IMAGE_HW = "image_hw"
CLASS_MAP = "class_map"
MAP_HW = "map_hw"
SEMANTIC_MAP = "semantic_map"
PROBS = "probs"
SEG_FEAT = "seg_feat"
SEG_MAP = "seg_map"
CAT_ONEHOT = "cat_onehot"
REGION_CLASS_HIST = "region_class_hist"
REGION_GEOMETRY = "region_geometry"
REGION_SALIENCY = "region_saliency"

#: the ``source`` of a stage config written by ``shnet import``: its arrays keep the files' dtypes
IMPORT_SOURCE = "npy-import"

LAYOUT_INPUTS = (SEG_FEAT, SEG_MAP, CAT_ONEHOT)  # the 3SHNet segmentation inputs of every image
LAYOUT_REGION_ARRAYS = (REGION_CLASS_HIST, REGION_GEOMETRY, REGION_SALIENCY)  # only when the cache has regions


@dataclass(frozen=True)
class ArraySpec:
    """One per-image output array: its shape per image, dtype and fill value for failed images."""

    shape: tuple
    dtype: str
    fill: float = 0


@dataclass(frozen=True)
class ArrayDef:
    """One array of a stage as the schema defines it: per-image shape (ints and symbols), dtype as
    extract writes it, fill value of failed images, and the array that counts its valid rows."""

    name: str
    shape: tuple
    dtype: str
    fill: float = 0
    valid_count: tuple[str, str] | None = None  # (stage, array): rows past that count are padding

    def spec(self, sizes: Mapping[str, int]) -> ArraySpec:
        """The concrete :class:`ArraySpec` with ``sizes`` given for the shape's symbols."""
        return ArraySpec(tuple(sizes[d] if isinstance(d, str) else d for d in self.shape), self.dtype, self.fill)


_REGION_ROWS = (REGIONS, NUM_BOXES)

STAGE_ARRAYS: dict[str, dict[str, ArrayDef]] = {
    stage: {array.name: array for array in arrays}
    for stage, arrays in (
        (PROBE, (ArrayDef(SIZE, (HW,), "int32", -1),)),
        (GRID, (ArrayDef(GRID_FEATURES, (G, G, C), "float16", valid_count=(GRID, VALID_HW)), ArrayDef(VALID_HW, (HW,), "int16"))),
        (SALIENCY, (ArrayDef(SALIENCY_MAP, (S, S), "float16"),)),
        (
            REGIONS,
            (
                ArrayDef(FEATURES, (K, D), "float16", valid_count=_REGION_ROWS),
                ArrayDef(BOXES, (K, BOX_COORDS), "float32", valid_count=_REGION_ROWS),
                ArrayDef(NUM_BOXES, (), "int32"),
                ArrayDef(OBJECT_CLASS, (K,), "int16", valid_count=_REGION_ROWS),
                ArrayDef(OBJECT_SCORE, (K,), "float32", valid_count=_REGION_ROWS),
                ArrayDef(ATTR_CLASS, (K,), "int16", valid_count=_REGION_ROWS),
                ArrayDef(ATTR_SCORE, (K,), "float32", valid_count=_REGION_ROWS),
                ArrayDef(IMAGE_HW, (HW,), "int32"),
            ),
        ),
        (
            PANOPTIC,
            (
                ArrayDef(CLASS_MAP, (R, R), "uint8", VOID, valid_count=(PANOPTIC, MAP_HW)),
                ArrayDef(MAP_HW, (HW,), "int16"),
                ArrayDef(SEMANTIC_MAP, (R, R), "uint8", VOID, valid_count=(PANOPTIC, MAP_HW)),
                ArrayDef(PROBS, (NUM_CLASSES, SEG_CELLS, SEG_CELLS), "float16"),
            ),
        ),
        (
            LAYOUT,
            (
                ArrayDef(SEG_FEAT, (NUM_CLASSES, SEG_CELLS, SEG_CELLS), "float16"),
                ArrayDef(SEG_MAP, (SEG_MAP_SIZE, SEG_MAP_SIZE), "uint8", VOID),
                ArrayDef(CAT_ONEHOT, (NUM_CLASSES,), "uint8"),
                ArrayDef(REGION_CLASS_HIST, (K, NUM_CLASSES), "float16", valid_count=_REGION_ROWS),
                ArrayDef(REGION_GEOMETRY, (K, GEOMETRY_DIM), "float32", valid_count=_REGION_ROWS),
                ArrayDef(REGION_SALIENCY, (K,), "float16", valid_count=_REGION_ROWS),
            ),
        ),
    )
}


def is_imported(config: Mapping | None) -> bool:
    """Whether a stage's recorded config says it was imported from a ``.npy`` set."""
    return (config or {}).get("source") == IMPORT_SOURCE


def specs(stage: str, names: Iterable[str] | None = None, **sizes: int) -> dict[str, ArraySpec]:
    """The :class:`ArraySpec` of ``names`` (default: every array) of ``stage``, symbols from ``sizes``."""
    arrays = STAGE_ARRAYS[stage]
    return {name: arrays[name].spec(sizes) for name in (arrays if names is None else names)}


def filled(stage: str, images: int, names: Iterable[str] | None = None, **sizes: int) -> dict[str, np.ndarray]:
    """Arrays of ``names`` (default: every array) of ``stage`` for ``images`` images, each at its
    fill value (the padding every writer starts from)."""
    return {name: np.full((images,) + spec.shape, spec.fill, spec.dtype) for name, spec in specs(stage, names, **sizes).items()}


# --- the valid-rows rule -------------------------------------------------------------------------
def valid_rows(padded: np.ndarray, count) -> np.ndarray:
    """One image's padded array cut to its ``count`` valid leading rows (regions: ``num_boxes``)."""
    return padded[: int(count)]


def valid_mask(counts: np.ndarray, slots: int) -> np.ndarray:
    """[N, slots] bool: which rows of N images' padded arrays are valid, given their counts."""
    return np.arange(slots)[None, :] < np.asarray(counts).reshape(-1, 1)


def valid_area(padded: np.ndarray, hw) -> np.ndarray:
    """One image's padded 2-D array (a grid, a stored map) cut to its valid (rows, columns) ``hw``
    (the grid stage's ``valid_hw``, the panoptic stage's ``map_hw``)."""
    h, w = (int(v) for v in hw)
    return padded[:h, :w]


def valid_cells(padded: np.ndarray, hw) -> np.ndarray:
    """One image's padded [G, G, C] grid's valid cells, flattened row-major to [rows * columns, C]."""
    cells = valid_area(padded, hw)
    return cells.reshape(-1, cells.shape[-1])


# --- checking stored arrays ----------------------------------------------------------------------
def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def counting_stages(stage: str) -> dict[str, set[str]]:
    """Other stages whose count arrays say which rows of ``stage``'s arrays are valid, each with the
    symbols the two share (layout: ``{"regions": {"K"}}``): the same shard must agree on them."""
    shared: dict[str, set[str]] = {}
    for array in STAGE_ARRAYS.get(stage, {}).values():
        if array.valid_count is not None and array.valid_count[0] != stage:
            shared.setdefault(array.valid_count[0], set()).add(array.shape[0])
    return shared


def symbol_sizes(stage: str, arrays: Mapping[str, tuple[tuple, np.dtype]]) -> dict[str, tuple[int, str]]:
    """Each symbol's size in one shard of ``stage`` (name -> per-image shape, dtype), with the
    ``stage/array`` that gives it (the first array that binds it)."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, (shape, _) in arrays.items():
        expected = STAGE_ARRAYS.get(stage, {}).get(name)
        if expected is not None and len(expected.shape) == len(shape):
            for symbol, size in zip(expected.shape, shape):
                if isinstance(symbol, str):
                    sizes.setdefault(symbol, (int(size), f"{stage}/{name}"))
    return sizes


def check_arrays(
    stage: str, arrays: Mapping[str, tuple[tuple, np.dtype]], imported: bool = False, known: Mapping[str, tuple[int, str]] | None = None
) -> list[str]:
    """Problems of one shard's stored arrays (name -> per-image shape, dtype) against the schema:
    unknown names, shapes that break a fixed size or bind a symbol to two values (``known``: sizes
    another stage's shard already gives, see :func:`counting_stages`), dtypes other than extract
    writes (an ``imported`` set keeps its files' numeric dtypes). A stage the schema does not know
    has nothing to check."""
    defined = STAGE_ARRAYS.get(stage)
    if defined is None:
        return []
    problems: list[str] = []
    bound: dict[str, tuple[int, str]] = dict(known or {})  # symbol -> (value, array that set it)
    for name, (shape, dtype) in arrays.items():
        expected = defined.get(name)
        if expected is None:
            problems.append(f"array '{name}' is not one stage '{stage}' stores (it stores {', '.join(defined)})")
            continue
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        if len(shape) != len(expected.shape) or any(isinstance(e, int) and e != d for e, d in zip(expected.shape, shape)):
            problems.append(f"array '{name}' has per-image shape {_shape_text(shape)}, the schema says {_shape_text(expected.shape)}")
        else:
            for symbol, size in zip(expected.shape, shape):
                if not isinstance(symbol, str):
                    continue
                value, origin = bound.setdefault(symbol, (size, name))
                if value != size:
                    other = "its other axes give" if origin == name else f"'{origin}' gives"
                    problems.append(f"array '{name}' has per-image shape {_shape_text(shape)}, so {symbol}={size}, but {other} {symbol}={value}")
        if imported:
            if dtype.kind not in "biuf":
                problems.append(f"array '{name}' has dtype {dtype}, not a number type")
        elif dtype != np.dtype(expected.dtype):
            problems.append(f"array '{name}' has dtype {dtype}, the schema says {expected.dtype}")
    return problems
