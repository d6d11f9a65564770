"""Stage ``layout``: the 3SHNet segmentation inputs, derived from stored stages (no image is decoded).

Per image, from stage ``panoptic``: ``seg_map`` [64,64] uint8 (the full-resolution class map resized
by nearest neighbour, exactly: see :mod:`shnet.pipeline.segmaps`), ``cat_onehot`` [133] uint8 (classes
whose segments cover more than 100 full-resolution pixels, from the segments table) and ``seg_feat``
[133,7,7] fp16 (``layout.seg_feat``: ``area``, each 7x7 cell's class fractions of the stored map, or
``probs``, the panoptic model's pooled class probabilities).

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

from ...cache.store import Cache, ShardWriter
from ...errors import ShnetError
from ..segmaps import (
    CELLS,
    NUM_CLASSES,
    SEG_MAP_SIZE,
    VOID,
    box_class_histograms,
    box_geometry,
    box_mean_saliency,
    cell_area_fractions,
    float16_at_most,
    present_classes,
    seg_map_from_stored,
)
from .base import ArraySpec, ShardJob, Stage

SEG_FEAT_SOURCES = ("area", "probs")


class LayoutStage(Stage):
    name = "layout"
    requires = ("panoptic",)
    uses = ("regions", "saliency")
    defaults = {"seg_feat": "area"}
    description = "3SHNet inputs seg_feat, seg_map, cat_onehot (+ per-region class histograms, saliency, geometry)"

    def resolve_config(self, options):
        config = super().resolve_config(options)
        if config["seg_feat"] not in SEG_FEAT_SOURCES:
            raise ShnetError(f"layout.seg_feat must be one of {', '.join(SEG_FEAT_SOURCES)} (got {config['seg_feat']!r})")
        return config

    def outputs(self, config, model):
        return {
            "seg_feat": ArraySpec((NUM_CLASSES, CELLS, CELLS), "float16"),
            "seg_map": ArraySpec((SEG_MAP_SIZE, SEG_MAP_SIZE), "uint8", VOID),
            "cat_onehot": ArraySpec((NUM_CLASSES,), "uint8"),
        }

    def region_outputs(self, boxes_per_image: int, with_saliency: bool) -> dict[str, ArraySpec]:
        specs = {
            "region_class_hist": ArraySpec((boxes_per_image, NUM_CLASSES), "float16"),
            "region_geometry": ArraySpec((boxes_per_image, 7), "float32"),
        }
        if with_saliency:
            specs["region_saliency"] = ArraySpec((boxes_per_image,), "float16")
        return specs

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
        map_h, map_w = (int(v) for v in inputs.map_hw[row])
        stored = inputs.panoptic["class_map"][row, :map_h, :map_w]
        categories, areas = inputs.segments_of(row)
        onehot = present_classes(categories, areas)
        if job.config["seg_feat"] == "area":
            seg_feat = float16_at_most(cell_area_fractions(stored))
        else:
            seg_feat = inputs.panoptic["probs"][row]
        writer.write("seg_feat", row, seg_feat)
        writer.write("seg_map", row, seg_map_from_stored(stored))
        writer.write("cat_onehot", row, onehot)
        if inputs.boxes is not None:
            self._regions(writer, inputs, row, stored)
        return {"row": row, "status": "ok", "error": "", "seconds": time.perf_counter() - start, "num_present": int(onehot.sum())}

    @staticmethod
    def _regions(writer: ShardWriter, inputs: "_ShardInputs", row: int, stored: np.ndarray) -> None:
        count = int(inputs.num_boxes[row])
        image_hw = tuple(int(v) for v in inputs.image_hw[row])
        if count == 0 or min(image_hw) <= 0:
            return
        boxes = inputs.boxes[row, :count]
        k = inputs.boxes.shape[1]
        hist = np.zeros((k, NUM_CLASSES), np.float16)
        hist[:count] = float16_at_most(box_class_histograms(stored, boxes, image_hw))
        geometry = np.zeros((k, 7), np.float32)
        geometry[:count] = box_geometry(boxes, image_hw)
        writer.write("region_class_hist", row, hist)
        writer.write("region_geometry", row, geometry)
        if inputs.saliency is not None:
            saliency = np.zeros(k, np.float16)
            saliency[:count] = box_mean_saliency(inputs.saliency[row], boxes, image_hw)
            writer.write("region_saliency", row, saliency)


class _ShardInputs:
    """One shard of the stages layout reads: panoptic always, regions and saliency when the cache has them."""

    def __init__(self, cache: Cache, shard: int):
        self.files: list[h5py.File] = []
        self.panoptic = self._open(cache, "panoptic", shard)
        self.map_hw = self.panoptic["map_hw"][:]
        table = pd.read_parquet(cache.table_path("panoptic", shard))
        self.table = table.set_index("row")
        segments = pd.read_parquet(cache.table_path("panoptic", shard, "segments"), columns=["image_id", "category", "area"])
        self.segments = {image_id: part for image_id, part in segments.groupby("image_id", sort=False)}
        self.boxes = self.num_boxes = self.image_hw = self.saliency = None
        stages = set(cache.recorded_stages())
        if "regions" in stages:
            regions = self._open(cache, "regions", shard)
            self.boxes = regions["boxes"][:]
            self.num_boxes = regions["num_boxes"][:]
            self.image_hw = regions["image_hw"][:]
            if "saliency" in stages:
                self.saliency = self._open(cache, "saliency", shard)["saliency"]

    def _open(self, cache: Cache, stage: str, shard: int) -> h5py.File:
        if not cache.is_done(stage, shard):
            raise ShnetError(f"stage 'layout' needs shard {shard} of stage '{stage}', which is not complete in {cache.root}; re-run the extract")
        handle = cache.open_arrays(stage, shard)
        self.files.append(handle)
        return handle

    def panoptic_status(self, row: int) -> tuple[str, str]:
        entry = self.table.loc[row]
        return str(entry["status"]), str(entry["error"])

    def segments_of(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        part = self.segments.get(self.table.at[row, "image_id"])
        if part is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return part["category"].to_numpy(), part["area"].to_numpy()

    def close(self) -> None:
        for handle in self.files:
            handle.close()
