"""Backend ``detectron2`` of stage ``panoptic``: detectron2's Panoptic FPN, where detectron2 is importable.

detectron2 is on no package registry and never a dependency: it is imported here, lazily. The model
folder (``panoptic.model``) holds the detectron2 ``config.yaml`` and its weights (``model_final.pkl``
or ``.pth``); weights are read with shnet's safe loaders (no pickled code runs), then handed to
detectron2's checkpointer. Labels come from the config's test-dataset metadata (thing classes, then
stuff classes after the merged ``things`` entry) and are matched to COCO panoptic like any model's.

``probs``: the semantic head's stuff probabilities and each thing class's score-weighted instance
masks (clipped to 1), pooled per 7x7 cell; Panoptic FPN has no single per-pixel class distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...weights import load_weights_file, mismatch_report, to_tensor_dict
from ...data import coco_panoptic_categories
from ...errors import ShnetError
from ...cache.schema import NUM_CLASSES, SEG_CELLS, VOID
from ..segmaps import PanopticResult, segments_from_id_map
from .panoptic_labels import match_labels, read_label_map

WEIGHT_NAMES = ("model_final.pkl", "model_final.pth", "model.pkl", "model.pth")


@dataclass
class Detectron2Panoptic:
    model: Any
    thing_lut: np.ndarray  # thing class id -> COCO index
    stuff_lut: np.ndarray  # semantic label (0 = merged things) -> COCO index
    min_size: int
    max_size: int
    input_format: str
    name: str


def _import_detectron2():
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise ShnetError(
            "panoptic.backend=detectron2 needs detectron2, which is not installed here (it is on no package registry: "
            "build it from source, see detectron2's INSTALL.md), or use panoptic.backend=hf with a Mask2Former folder"
        ) from exc


def _files(folder: str | None) -> tuple[Path, Path]:
    if folder is None:
        raise ShnetError("panoptic.backend=detectron2 needs a folder with config.yaml and the weights: --set panoptic.model=/path/to/panoptic_fpn")
    path = Path(folder).expanduser()
    config = path / "config.yaml"
    weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    if not config.is_file() or weights is None:
        raise ShnetError(f"panoptic.model {path} needs config.yaml and one of {', '.join(WEIGHT_NAMES)} (a detectron2 Panoptic FPN)")
    return config, weights


def _config(folder: str, device: str):
    from detectron2.config import get_cfg

    config_file, weights = _files(folder)
    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = "cuda" if device.startswith("cuda") else "cpu"
    if cfg.MODEL.META_ARCHITECTURE != "PanopticFPN":
        raise ShnetError(f"panoptic.model {config_file} configures a {cfg.MODEL.META_ARCHITECTURE}; the detectron2 backend runs PanopticFPN")
    return cfg, weights


def _lookups(cfg, folder: str, label_map_path: str | None) -> tuple[np.ndarray, np.ndarray]:
    from detectron2.data import MetadataCatalog

    categories = coco_panoptic_categories()
    things = [c.name for c in categories if c.is_thing]
    stuff = ["things"] + [c.name for c in categories if not c.is_thing]
    if cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        things = list(getattr(meta, "thing_classes", things))
        stuff = list(getattr(meta, "stuff_classes", stuff))
    label_map = read_label_map(label_map_path)
    source = f"panoptic.model {folder}"
    thing_lut = match_labels(dict(enumerate(things)), label_map, source, label_map_path)
    stuff_lut = match_labels(dict(enumerate(stuff[1:], start=1)), label_map, source, label_map_path) if len(stuff) > 1 else np.zeros(1, np.int64)
    stuff_lut[0] = VOID
    return thing_lut, stuff_lut


def check_detectron2_model(folder: str | None, label_map_path: str | None) -> None:
    _files(folder)
    _import_detectron2()
    load_detectron2_panoptic(folder, label_map_path, "cpu")


def load_detectron2_panoptic(folder: str, label_map_path: str | None, device: str) -> Detectron2Panoptic:
    _import_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg, weights = _config(folder, device)
    thing_lut, stuff_lut = _lookups(cfg, folder, label_map_path)
    model = build_model(cfg).eval()
    raw = load_weights_file(weights)
    state = to_tensor_dict(raw.get("model", raw) if isinstance(raw, dict) else raw)
    report = mismatch_report(model.state_dict(), state)
    if report:
        raise ShnetError(f"panoptic.model weights {weights} do not match the configured Panoptic FPN:\n" + "\n".join(report[:20]))
    DetectionCheckpointer(model)._load_model({"model": state, "matching_heuristics": False})
    return Detectron2Panoptic(
        model=model,
        thing_lut=thing_lut,
        stuff_lut=stuff_lut,
        min_size=int(cfg.INPUT.MIN_SIZE_TEST),
        max_size=int(cfg.INPUT.MAX_SIZE_TEST),
        input_format=str(cfg.INPUT.FORMAT),
        name=Path(folder).name,
    )


def preprocess(rgb: np.ndarray, bundle: Detectron2Panoptic) -> dict:
    """detectron2's test-time input: shortest-edge resize, channels in the model's format."""
    from detectron2.data import transforms as T

    pixels = rgb[:, :, ::-1] if bundle.input_format == "BGR" else rgb
    resized = T.ResizeShortestEdge([bundle.min_size, bundle.min_size], bundle.max_size).get_transform(pixels).apply_image(pixels)
    height, width = rgb.shape[:2]
    return {"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": height, "width": width}


def infer(bundle: Detectron2Panoptic, prepared: list, options: dict, device: str) -> list[PanopticResult]:
    inputs = [{**p, "image": p["image"].to(device)} for p in prepared]
    with torch.inference_mode():
        outputs = bundle.model(inputs)
    return [_one_image(bundle, out) for out in outputs]


def _one_image(bundle: Detectron2Panoptic, out: dict) -> PanopticResult:
    segment_ids, info = out["panoptic_seg"]
    classes, scores = {}, {}
    for s in info:
        lut = bundle.thing_lut if s["isthing"] else bundle.stuff_lut
        classes[int(s["id"])] = int(lut[int(s["category_id"])])
        scores[int(s["id"])] = float(s.get("score", float("nan")))
    class_map, segments = segments_from_id_map(segment_ids.cpu().numpy(), classes)
    for segment in segments:
        segment["score"] = scores[segment["segment"]]
    return PanopticResult(class_map=class_map, segments=segments, probs=_pooled_probabilities(bundle, out))


def _pooled_probabilities(bundle: Detectron2Panoptic, out: dict) -> np.ndarray:
    probs = np.zeros((NUM_CLASSES, SEG_CELLS, SEG_CELLS), dtype=np.float32)
    stuff = F.adaptive_avg_pool2d(out["sem_seg"].float().softmax(0)[None], SEG_CELLS)[0].cpu().numpy()
    known = bundle.stuff_lut[: len(stuff)] != VOID
    np.add.at(probs, bundle.stuff_lut[: len(stuff)][known], stuff[known])
    instances = out["instances"]
    if len(instances):
        masks = instances.pred_masks.float() * instances.scores.float()[:, None, None]
        pooled = F.adaptive_avg_pool2d(masks[None], SEG_CELLS)[0].cpu().numpy()
        targets = bundle.thing_lut[instances.pred_classes.cpu().numpy()]
        known = targets != VOID
        np.add.at(probs, targets[known], pooled[known])
    return np.minimum(probs, 1.0)
