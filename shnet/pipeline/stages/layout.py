"""Stage ``layout``: the 3SHNet segmentation inputs, derived from stored stages (no image is decoded).

Per image, from stage ``panoptic``: ``seg_map`` [64,64] uint8 (the full-resolution class map resized
by nearest neighbour, exactly, as the panoptic stage's ``seg_map_sampling`` says: see
:mod:`shnet.pipeline.segmaps`), ``cat_onehot`` [133] uint8 (classes covering more than 100
full-resolution pixels: the segments' areas, plus the void pixels filled with the class) and
``seg_feat`` [133,7,7] fp16 (``layout.seg_feat``: ``area``, each 7x7 cell's class fractions of the
stored map, or ``probs``, the panoptic model's pooled class probabilities).

``layout.void``: ``fill`` (default; the published maps had no void: 3SHNet's loader indexes
``cat_onehot`` by every pixel value) gives each void pixel the panoptic model's most probable class
there, or the nearest labelled pixel's class where the backend has no per-pixel probabilities;
``keep`` leaves 255. ``layout.class_order``: ``coco`` (COCO panoptic, things first) or ``upsnet``
(stuff first, the order of UPSNet, whose maps 3SHNet says it used): class ids in ``seg_map``, the
slots of ``cat_onehot`` and the channels of ``seg_feat`` and ``region_class_hist`` follow it.

When the cache has stage ``regions``, per region box as well: ``region_class_hist`` [K,133] fp16
(class fractions of the stored map inside the box), ``region_geometry`` [K,7] float32 (x1, y1, x2, y2,
w, h, area normalised by the image size) and, when the cache also has ``saliency``,
``region_saliency`` [K] fp16 (mean saliency inside the box); rows beyond ``num_boxes`` are 0.
Which of those stages a cache has is decided when layout runs: a layout extracted before a
regions stage was added carries no region arrays (extract into a new cache to get them).
"""

from __future__ import annotations

import time

import h5py
import numpy as np
import pandas as pd

from ...cache import schema
from ...cache.schema import GEOMETRY_DIM, NUM_CLASSES, VOID, ArraySpec, valid_area, valid_rows
from ...cache.store import Cache, ShardWriter
from ...errors import ShnetError
from ..segmaps import (
    CLASS_ORDERS,
    box_class_histograms,
    box_geometry,
    box_mean_saliency,
    category_names,
    cell_area_fractions,
    class_order_lut,
    fill_void,
    float16_at_most,
    present_classes,
    seg_map_from_stored,
)
from .base import ShardJob, Stage

SEG_FEAT_SOURCES = ("area", "probs")
VOID_HANDLING = ("fill", "keep")
SAMPLING_BEFORE_OPTION = "centre"  # caches whose panoptic config predates panoptic.seg_map_sampling


class LayoutStage(Stage):
    name = schema.LAYOUT
    requires = (schema.PANOPTIC,)
    uses = (schema.REGIONS, schema.SALIENCY)
    defaults = {"seg_feat": "area", "void": "fill", "class_order": "coco"}
    description = "3SHNet inputs seg_feat, seg_map, cat_onehot (+ per-region class histograms, saliency, geometry)"

    def resolve_config(self, options):
        config = super().resolve_config(options)
        for key, choices in (("seg_feat", SEG_FEAT_SOURCES), ("void", VOID_HANDLING), ("class_order", CLASS_ORDERS)):
            if config[key] not in choices:
                raise ShnetError(f"layout.{key} must be one of {', '.join(choices)} (got {config[key]!r})")
        return config

    def attrs(self, config, model):
        names = category_names()
        order = np.argsort(class_order_lut(config["class_order"])[:NUM_CLASSES])
        return {"class_order": config["class_order"], "class_names": [names[i] for i in order]}

    def outputs(self, config, model):
        return schema.specs(schema.LAYOUT, schema.LAYOUT_INPUTS)

    def region_outputs(self, boxes_per_image: int, with_saliency: bool) -> dict[str, ArraySpec]:
        names = schema.LAYOUT_REGION_ARRAYS if with_saliency else (schema.REGION_CLASS_HIST, schema.REGION_GEOMETRY)
        return schema.specs(schema.LAYOUT, names, K=boxes_per_image)

    def run(self, job: ShardJob, writer: ShardWriter, model) -> pd.DataFrame:
        cache = Cache(job.cache_root)
        inputs = _ShardInputs(cache, job.shard)
        try:
            specs = dict(self.outputs(job.config, model))
            if inputs.boxes is not None:
                specs.update(self.region_outputs(inputs.boxes.shape[1], inputs.saliency is not None))
            for name, spec in specs.items():
                writer.create(name, spec.shape, spec.dtype, spec.fill)
            records = [self._one_image(job, writer, inputs, row) for row in job.images["row"].astype(int)]
        finally:
            inputs.close()
        table = pd.DataFrame(records)
        table.insert(0, "image_id", job.images["image_id"].to_numpy())
        return table

    def _one_image(self, job: ShardJob, writer: ShardWriter, inputs: "_ShardInputs", row: int) -> dict:
        start = time.perf_counter()
        status, error = inputs.panoptic_status(row)
        if status != "ok":
            return {"row": row, "status": "error", "error": f"panoptic: {error}", "seconds": 0.0, "num_present": 0}
        map_hw = inputs.map_hw[row]
        stored = valid_area(inputs.panoptic[schema.CLASS_MAP][row], map_hw)
        categories, areas = inputs.segments_of(row)
        if job.config["void"] == "fill":
            semantic = valid_area(inputs.semantic_map[row], map_hw) if inputs.semantic_map is not None else None
            filled = fill_void(stored, semantic)
            categories, areas = _with_filled_areas(categories, areas, stored, filled, inputs.full_size(row))
            stored = filled
        lut = class_order_lut(job.config["class_order"])
        stored, categories = lut[stored], lut[np.asarray(categories, dtype=np.int64)]
        onehot = present_classes(categories, areas)
        if job.config["seg_feat"] == "area":
            seg_feat = float16_at_most(cell_area_fractions(stored))
        else:
            seg_feat = inputs.panoptic[schema.PROBS][row][np.argsort(lut[:NUM_CLASSES])]
        writer.write(schema.SEG_FEAT, row, seg_feat)
        writer.write(schema.SEG_MAP, row, seg_map_from_stored(stored, inputs.sampling))
        writer.write(schema.CAT_ONEHOT, row, onehot)
        if inputs.boxes is not None:
            self._regions(writer, inputs, row, stored)
        return {"row": row, "status": "ok", "error": "", "seconds": time.perf_counter() - start, "num_present": int(onehot.sum())}

    @staticmethod
    def _regions(writer: ShardWriter, inputs: "_ShardInputs", row: int, stored: np.ndarray) -> None:
        count = int(inputs.num_boxes[row])
        image_hw = tuple(int(v) for v in inputs.image_hw[row])
        if count == 0 or min(image_hw) <= 0:
            return
        boxes = valid_rows(inputs.boxes[row], count)
        k = inputs.boxes.shape[1]
        hist = np.zeros((k, NUM_CLASSES), np.float16)
        hist[:count] = float16_at_most(box_class_histograms(stored, boxes, image_hw))
        geometry = np.zeros((k, GEOMETRY_DIM), np.float32)
        geometry[:count] = box_geometry(boxes, image_hw)
        writer.write(schema.REGION_CLASS_HIST, row, hist)
        writer.write(schema.REGION_GEOMETRY, row, geometry)
        if inputs.saliency is not None:
            saliency = np.zeros(k, np.float16)
            saliency[:count] = box_mean_saliency(inputs.saliency[row], boxes, image_hw)
            writer.write(schema.REGION_SALIENCY, row, saliency)


def _with_filled_areas(categories, areas, stored: np.ndarray, filled: np.ndarray, full_hw: tuple[int, int]):
    """Segment classes and areas plus, per class, the full-resolution area its filled void pixels
    stand for (each stored pixel stands for the same share of the image), for the 100-pixel rule."""
    newly = filled[(stored == VOID) & (filled != VOID)]
    if not newly.size:
        return categories, areas
    per_class = np.bincount(newly, minlength=NUM_CLASSES)[:NUM_CLASSES]
    classes = np.nonzero(per_class)[0]
    share = full_hw[0] * full_hw[1] / stored.size
    return np.concatenate([categories, classes]), np.concatenate([areas, per_class[classes] * share])


class _ShardInputs:
    """One shard of the stages layout reads: panoptic always, regions and saliency when the cache has them."""

    def __init__(self, cache: Cache, shard: int):
        self.files: list[h5py.File] = []
        self.panoptic = self._open(cache, schema.PANOPTIC, shard)
        self.map_hw = self.panoptic[schema.MAP_HW][:]
        self.semantic_map = self.panoptic[schema.SEMANTIC_MAP] if schema.SEMANTIC_MAP in self.panoptic else None
        self.sampling = (cache.stage_config(schema.PANOPTIC) or {}).get("seg_map_sampling", SAMPLING_BEFORE_OPTION)
        table = pd.read_parquet(cache.table_path(schema.PANOPTIC, shard))
        self.table = table.set_index("row")
        segments = pd.read_parquet(cache.table_path(schema.PANOPTIC, shard, "segments"), columns=["image_id", "category", "area"])
        self.segments = {image_id: part for image_id, part in segments.groupby("image_id", sort=False)}
        self.boxes = self.num_boxes = self.image_hw = self.saliency = None
        stages = set(cache.recorded_stages())
        if schema.REGIONS in stages:
            regions = self._open(cache, schema.REGIONS, shard)
            self.boxes = regions[schema.BOXES][:]
            self.num_boxes = regions[schema.NUM_BOXES][:]
            self.image_hw = regions[schema.IMAGE_HW][:]
            if schema.SALIENCY in stages:
                self.saliency = self._open(cache, schema.SALIENCY, shard)[schema.SALIENCY_MAP]

    def _open(self, cache: Cache, stage: str, shard: int) -> h5py.File:
        if not cache.is_done(stage, shard):
            raise ShnetError(f"stage 'layout' needs shard {shard} of stage '{stage}', which is not complete in {cache.root}; re-run the extract")
        handle = cache.open_arrays(stage, shard)
        self.files.append(handle)
        return handle

    def panoptic_status(self, row: int) -> tuple[str, str]:
        entry = self.table.loc[row]
        return str(entry["status"]), str(entry["error"])

    def full_size(self, row: int) -> tuple[int, int]:
        """The full-resolution (height, width) the segments' areas refer to."""
        return int(self.table.at[row, "height"]), int(self.table.at[row, "width"])

    def segments_of(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        part = self.segments.get(self.table.at[row, "image_id"])
        if part is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return part["category"].to_numpy(), part["area"].to_numpy()

    def close(self) -> None:
        for handle in self.files:
            handle.close()
