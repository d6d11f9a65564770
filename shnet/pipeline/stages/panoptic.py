"""Stage ``panoptic``: COCO panoptic segmentation (133 classes) of every image.

Per image: ``class_map`` [R,R] uint8 (class index per pixel, longer side R = ``resolution``, nearest
neighbour with the 64x64 grid of ``seg_map`` embedded as ``seg_map_sampling`` samples it, see
:mod:`shnet.pipeline.segmaps`; 255 = void and padding), ``map_hw`` [2] int16 (its valid height,
width), ``semantic_map`` [R,R] uint8 (the most probable class at the same pixels, from the backend's
per-pixel class probabilities; all 255 for backends without them: ``coco``, ``detectron2``; the
layout stage fills void from it) and ``probs`` [133,7,7] fp16 (pooled class probabilities; zeros
for the ``coco`` backend). Further table ``segments``: one row per segment with
its class, area and bbox at full resolution and score. Table scalars: ``num_segments`` and the full
``height``/``width`` that areas and boxes refer to. An image where nothing is found gets an all-void map.

Backends: ``hf`` (a local transformers Mask2Former / MaskFormer / OneFormer folder), ``coco``
(COCO-panoptic-format annotations: the PNGs + JSON, matched to images by file name stem) and
``detectron2`` (Panoptic FPN, where detectron2 is importable).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...weights import weights_identity
from ...cache import schema
from ...cache.schema import SEG_MAP_SIZE, VOID
from ...errors import ShnetError
from ..segmaps import (
    SAMPLINGS,
    PanopticResult,
    category_names,
    downsample_for_storage,
    pad_map,
    stored_most_probable,
    thing_flags,
)
from .base import ImageStage, ShardJob, StageOutput

BACKENDS = ("hf", "coco", "detectron2")
SEGMENT_COLUMNS = ["image_id", "segment", "category", "category_name", "is_thing", "area", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "score"]
MISSING_MODEL = {
    "hf": (
        "stage 'panoptic' (backend hf) needs a local Hugging Face model folder: "
        "--set panoptic.model=/path/to/mask2former-swin-large-coco-panoptic (saved with save_pretrained; see the README, "
        "'Panoptic segmentation'), or reads COCO-format annotations instead: "
        "--set panoptic.backend=coco --set panoptic.annotations=/path/panoptic_val2017.json"
    ),
    "detectron2": "panoptic.backend=detectron2 needs a folder with config.yaml and the weights: --set panoptic.model=/path/to/panoptic_fpn",
}
_SEGMENTS = "_segments"  # per-image segment lists carried through ImageStage.run, then made a table


class PanopticStage(ImageStage):
    name = schema.PANOPTIC
    defaults = {
        "backend": "hf",
        "model": None,
        "label_map": None,
        "threshold": 0.5,
        "mask_threshold": 0.5,
        "overlap_threshold": 0.8,
        "resolution": 320,
        "seg_map_sampling": "opencv",
        "annotations": None,
        "annotation_dir": None,
    }
    location_keys = ("model", "label_map", "annotations", "annotation_dir")
    description = "COCO panoptic class map, pooled class probabilities, segments table"

    def resolve_config(self, options):
        config = super().resolve_config(options)
        backend = config["backend"]
        if backend not in BACKENDS:
            raise ShnetError(f"panoptic.backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        try:
            config["resolution"] = int(config["resolution"])
            for key in ("threshold", "mask_threshold", "overlap_threshold"):
                config[key] = float(config[key])
        except (TypeError, ValueError) as exc:
            raise ShnetError(f"panoptic.resolution must be an integer and the thresholds numbers ({exc})") from exc
        if not SEG_MAP_SIZE <= config["resolution"] <= 4096:
            raise ShnetError(f"panoptic.resolution must be between {SEG_MAP_SIZE} and 4096 (got {config['resolution']})")
        if config["seg_map_sampling"] not in SAMPLINGS:
            raise ShnetError(
                f"panoptic.seg_map_sampling must be one of {', '.join(SAMPLINGS)} (got {config['seg_map_sampling']!r}); "
                "opencv samples as 3SHNet's cv2.resize(..., INTER_NEAREST) did"
            )
        if backend == "coco":
            if config["model"] is not None:
                raise ShnetError("panoptic.model is not used by panoptic.backend=coco (it reads panoptic.annotations)")
            if config["annotations"] is None:
                raise ShnetError("panoptic.backend=coco needs the COCO panoptic JSON: --set panoptic.annotations=/path/panoptic_val2017.json")
        else:
            for key in ("annotations", "annotation_dir"):
                if config[key] is not None:
                    raise ShnetError(f"panoptic.{key} is only used by panoptic.backend=coco")
            if config["model"] is None:
                raise ShnetError(MISSING_MODEL[backend])
        for key in ("model", "label_map", "annotations"):
            config[f"{key}_sha256"] = _content_identity(config, key)
        return config

    def check(self, config):
        backend = config["backend"]
        if backend == "hf":
            from ..models.panoptic_hf import check_hf_model

            check_hf_model(config["model"], config["label_map"])
        elif backend == "coco":
            from ..models.panoptic_coco import read_annotations

            read_annotations(config["annotations"], config["annotation_dir"], config["label_map"])
        else:
            from ..models.panoptic_d2 import check_detectron2_model

            check_detectron2_model(config["model"], config["label_map"])

    def needs_accelerator(self, config):
        return config["backend"] != "coco"  # the coco backend reads annotation files, runs no model

    def load(self, config, device):
        backend = config["backend"]
        if backend == "hf":
            from ..models.panoptic_hf import load_hf_panoptic

            return load_hf_panoptic(config["model"], config["label_map"], device)
        if backend == "coco":
            from ..models.panoptic_coco import read_annotations

            return read_annotations(config["annotations"], config["annotation_dir"], config["label_map"])
        from ..models.panoptic_d2 import load_detectron2_panoptic

        return load_detectron2_panoptic(config["model"], config["label_map"], device)

    def outputs(self, config, model):
        return schema.specs(schema.PANOPTIC, R=config["resolution"])

    def attrs(self, config, model):
        return {
            "backend": config["backend"],
            "model": getattr(model, "name", "") if config["backend"] != "coco" else str(config["annotations"]),
            "model_sha256": config["model_sha256"],
            "annotations_sha256": config["annotations_sha256"],
            "label_set": "coco-panoptic-133",
            "class_names": category_names(),
        }

    # --- image backends (hf, detectron2) --------------------------------------------------------
    def prepare(self, rgb, config, model):
        if config["backend"] == "hf":
            from ..models.panoptic_hf import preprocess
        else:
            from ..models.panoptic_d2 import preprocess
        return preprocess(rgb, model)

    def infer(self, model, prepared, config, device):
        if config["backend"] == "hf":
            from ..models.panoptic_hf import infer
        else:
            from ..models.panoptic_d2 import infer
        results = infer(model, prepared, config, device)
        return stage_output(results, config["resolution"], config["seg_map_sampling"])

    def run(self, job: ShardJob, writer, model: Any) -> pd.DataFrame:
        if job.config["backend"] == "coco":
            table = self._run_annotations(job, writer, model)
        else:
            table = super().run(job, writer, model)
        segments = table.pop(_SEGMENTS) if _SEGMENTS in table else pd.Series([0] * len(table))
        writer.add_table("segments", segments_table(table["image_id"].tolist(), segments.tolist()))
        for column in ("num_segments", "height", "width"):
            if column not in table:
                table[column] = 0
            table[column] = table[column].fillna(0).astype(np.int32)
        return table

    # --- annotation backend (coco): no image is decoded ------------------------------------------
    def _run_annotations(self, job: ShardJob, writer, annotations) -> pd.DataFrame:
        for name, spec in self.outputs(job.config, annotations).items():
            writer.create(name, spec.shape, spec.dtype, spec.fill)
        records = []
        for row, path, status, error in zip(job.images["row"], job.images["path"], job.images["status"], job.images["error"].fillna("")):
            record = {"row": int(row), "status": "error", "error": error, "seconds": 0.0}
            if status != "error":
                record.update(self._one_annotation(int(row), path, annotations, job.config, writer))
            records.append(record)
        table = pd.DataFrame(records)
        table.insert(0, "image_id", job.images["image_id"].to_numpy())
        return table

    @staticmethod
    def _one_annotation(row: int, path: str, annotations, config: dict, writer) -> dict:
        start = time.perf_counter()
        try:
            out = stage_output([annotations.result(path)], config["resolution"], config["seg_map_sampling"])
        except ShnetError as exc:
            return {"status": "error", "error": str(exc), "seconds": time.perf_counter() - start}
        for name, values in out.arrays.items():
            writer.write(name, row, values[0])
        scalars = {name: values[0] for name, values in out.scalars.items()}
        return {"status": "ok", "error": "", "seconds": time.perf_counter() - start, **scalars}


def _content_identity(config: dict, key: str) -> str:
    """sha256 of the file (or model folder) an option names: its content, not its path, is the identity."""
    value = config[key]
    if value is not None and not Path(str(value)).expanduser().exists():
        raise ShnetError(f"panoptic.{key}: no file or folder {value} (everything is read from local files; nothing is downloaded)")
    return weights_identity(value)


def stage_output(results: list[PanopticResult], resolution: int, sampling: str) -> StageOutput:
    """The stored arrays and table scalars of a batch of backend results."""
    maps, semantic, sizes = [], [], []
    for result in results:
        stored = downsample_for_storage(result.class_map, resolution, sampling)
        maps.append(pad_map(stored, resolution))
        sizes.append(stored.shape)
        if result.class_probs is None:
            semantic.append(np.full((resolution, resolution), VOID, np.uint8))
        else:
            semantic.append(pad_map(stored_most_probable(result.class_probs, result.class_map.shape, resolution, sampling), resolution))
    segments = np.empty(len(results), dtype=object)
    segments[:] = [r.segments for r in results]
    return StageOutput(
        arrays={
            schema.CLASS_MAP: np.stack(maps),
            schema.MAP_HW: np.asarray(sizes, dtype=np.int16),
            schema.SEMANTIC_MAP: np.stack(semantic),
            schema.PROBS: np.stack([r.probs for r in results]).astype(np.float16),
        },
        scalars={
            "num_segments": np.asarray([len(r.segments) for r in results], dtype=np.int32),
            "height": np.asarray([r.class_map.shape[0] for r in results], dtype=np.int32),
            "width": np.asarray([r.class_map.shape[1] for r in results], dtype=np.int32),
            _SEGMENTS: segments,
        },
    )


def segments_table(image_ids: list[str], per_image: list) -> pd.DataFrame:
    """One row per segment (images that failed carry no list, only a 0)."""
    names, things = category_names(), thing_flags()
    rows = []
    for image_id, segments in zip(image_ids, per_image):
        for s in segments if isinstance(segments, list) else []:
            x, y, w, h = s["bbox"]
            category = int(s["category"])
            rows.append((image_id, int(s["segment"]), category, names[category], bool(things[category]), int(s["area"]), x, y, w, h, float(s["score"])))
    frame = pd.DataFrame(rows, columns=SEGMENT_COLUMNS)
    return frame.astype(
        {"segment": "int32", "category": "int16", "is_thing": "bool", "area": "int64", "bbox_x": "int32", "bbox_y": "int32", "bbox_w": "int32", "bbox_h": "int32", "score": "float32"}
    )
