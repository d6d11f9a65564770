"""Backend ``hf`` of stage ``panoptic``: a transformers universal-segmentation model (Mask2Former,
MaskFormer, OneFormer) from a local folder, with its own image processor and panoptic post-processing.

Images are preprocessed one by one (the processor's resize/normalise, in the decode thread) and run
in batches of equal preprocessed size, never padded, so a result does not depend on its batch-mates
and the library's ``post_process_panoptic_segmentation`` (stuff classes fused) scales each image's
masks to its full resolution without any padding to shift them. The per-class probability volume is the
library's semantic combination (softmax class scores of the queries, no-object dropped, times
sigmoid masks) averaged per 7x7 cell of the valid area: since that combination is linear in the
masks, the masks are average-pooled first, which is exact and cheap. Post-processing runs where the
model ran: only the segment-id map and the two probability volumes come back to the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...data import coco_panoptic_categories
from ...errors import ShnetError
from ...cache.schema import NUM_CLASSES, SEG_CELLS, VOID
from ..segmaps import PanopticResult, segments_from_id_map
from .panoptic_labels import match_labels, read_label_map

SUPPORTED = ("mask2former", "maskformer", "oneformer")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class HFPanoptic:
    """A loaded model folder: model, processor, label lookup (model id -> COCO index) and its kind."""

    model: Any
    processor: Any
    lut: np.ndarray
    kind: str
    fuse: set
    name: str
    task_inputs: Any = None  # OneFormer's tokenised "the task is panoptic"


def read_model_config(folder: str) -> dict:
    """The folder's config.json, after checking the folder is a supported model saved offline."""
    path = Path(folder).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ShnetError(f"panoptic.model {path} is not a Hugging Face model folder (no config.json); save one with model.save_pretrained(PATH) and processor.save_pretrained(PATH)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ShnetError(f"{config_file} is not valid JSON: {exc}") from exc
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise ShnetError(f"panoptic.model {path} holds a '{kind}' model; the hf backend runs {', '.join(SUPPORTED)} universal-segmentation models")
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise ShnetError(
            f"panoptic.model {path} has no {' or '.join(PROCESSOR_FILES)}: save the model's image processor there too (processor.save_pretrained(PATH))"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ShnetError(f"panoptic.model {path} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    if kind == "oneformer" and not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        raise ShnetError(
            f"panoptic.model {path}: a OneFormer folder needs its text tokenizer saved beside the model "
            "(AutoProcessor.from_pretrained(NAME).save_pretrained(PATH) writes tokenizer.json / vocab.json)"
        )
    if not config.get("id2label"):
        raise ShnetError(f"{config_file} has no id2label: the model's label set is needed to match it to the COCO panoptic classes")
    return config


def label_lookup(folder: str, label_map_path: str | None) -> np.ndarray:
    """Model label id -> COCO class index (VOID where the label map says null)."""
    config = read_model_config(folder)
    id2label = {int(k): v for k, v in config["id2label"].items()}
    return match_labels(id2label, read_label_map(label_map_path), f"panoptic.model {folder}", label_map_path)


def check_hf_model(folder: str, label_map_path: str | None) -> None:
    """Config, label set and weights checked once in the client: the weights must load with no
    missing, unexpected or mis-shaped parameter."""
    load_hf_panoptic(folder, label_map_path, "cpu")


def load_hf_panoptic(folder: str, label_map_path: str | None, device: str) -> HFPanoptic:
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, AutoProcessor
    from transformers.utils import logging as hf_logging

    lut = label_lookup(folder, label_map_path)
    kind = read_model_config(folder)["model_type"]
    path = str(Path(folder).expanduser())
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForUniversalSegmentation.from_pretrained(path, output_loading_info=True, local_files_only=True)
        loader = AutoProcessor if kind == "oneformer" else AutoImageProcessor  # OneFormer's processor holds its tokenizer
        processor = loader.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ShnetError(f"panoptic.model {path} could not be loaded: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    problems = [f"missing {k}" for k in info.get("missing_keys", [])] + [f"unexpected {k}" for k in info.get("unexpected_keys", [])]
    problems += [f"shape mismatch {m}" for m in info.get("mismatched_keys", [])]
    if problems:
        shown = "; ".join(problems[:8]) + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ShnetError(f"panoptic.model {path}: the weights do not match the model's config ({shown}); re-save the folder with save_pretrained")
    things = [c.is_thing for c in coco_panoptic_categories()]
    fuse = {int(i) for i, c in enumerate(lut) if c != VOID and not things[c]}
    model.eval()
    if device.startswith("cuda"):
        model.to(device)
    task_inputs = None
    if kind == "oneformer":
        task_inputs = processor(images=[np.zeros((32, 32, 3), np.uint8)], task_inputs=["panoptic"], return_tensors="pt")["task_inputs"]
    return HFPanoptic(model=model, processor=processor, lut=lut, kind=kind, fuse=fuse, name=Path(path).name, task_inputs=task_inputs)


def preprocess(rgb: np.ndarray, bundle: HFPanoptic) -> tuple[torch.Tensor, tuple[int, int]]:
    """The processor's pixel values [3,h,w] of one image, and its full-resolution (height, width)."""
    processor = bundle.processor.image_processor if bundle.kind == "oneformer" else bundle.processor
    encoded = processor(images=[np.array(rgb)], return_tensors="pt")
    return encoded["pixel_values"][0], rgb.shape[:2]


def infer(bundle: HFPanoptic, prepared: list, options: dict, device: str) -> list[PanopticResult]:
    """Run one batch; ``options`` holds threshold, mask_threshold and overlap_threshold.

    Images go through the model together with those of the same preprocessed size only: padding
    would change the attention context of the smaller images, and a result must not depend on
    which images happen to share its batch."""
    results: list[PanopticResult | None] = [None] * len(prepared)
    groups: dict[tuple, list[int]] = {}
    for i, (pixels, _) in enumerate(prepared):
        groups.setdefault(tuple(pixels.shape), []).append(i)
    for members in groups.values():
        batch = torch.stack([prepared[i][0] for i in members]).to(device)
        inputs = {"pixel_values": batch}
        if bundle.kind == "oneformer":
            inputs["task_inputs"] = bundle.task_inputs.expand(len(members), -1).to(device)
        with torch.inference_mode():
            out = bundle.model(**inputs)
        class_logits = out.class_queries_logits.float()  # left on the device: post-processing runs there too
        mask_logits = out.masks_queries_logits.float()
        for j, i in enumerate(members):
            results[i] = _one_image(bundle, class_logits[j : j + 1], mask_logits[j : j + 1], prepared[i][1], options)
    return results


def _one_image(bundle: HFPanoptic, class_logits: torch.Tensor, masks: torch.Tensor, full_hw, options: dict) -> PanopticResult:
    processed = bundle.processor.post_process_panoptic_segmentation(
        SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=masks),
        threshold=options["threshold"],
        mask_threshold=options["mask_threshold"],
        overlap_mask_area_threshold=options["overlap_threshold"],
        label_ids_to_fuse=bundle.fuse,
        target_sizes=[tuple(int(s) for s in full_hw)],
    )[0]
    info = {int(s["id"]): s for s in processed["segments_info"]}
    classes = {sid: int(bundle.lut[int(s["label_id"])]) for sid, s in info.items()}
    class_map, segments = segments_from_id_map(processed["segmentation"].cpu().numpy(), classes)
    for segment in segments:
        segment["score"] = float(info[segment["segment"]]["score"])
    probs, class_probs = _probabilities(bundle.lut, class_logits[0], masks[0])
    return PanopticResult(class_map=class_map, segments=segments, probs=probs, class_probs=class_probs)


def _probabilities(lut: np.ndarray, class_logits: torch.Tensor, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[133,7,7] and [133,h,w]: each query's class probabilities weighted by its mask probability
    (transformers' semantic post-processing), model classes summed into COCO classes; averaged per
    7x7 cell (the masks pooled first: the volume is linear in them), and per pixel at the mask
    resolution. The per-pixel volume (only compared across classes, never stored) sums the queries'
    class probabilities into COCO classes before weighting them, and is computed classes-last: the
    [133,h,w] array is a view of [h,w,133] memory, the layout in which
    :func:`~shnet.pipeline.segmaps.stored_most_probable` compares classes."""
    class_probs = class_logits.softmax(-1)[:, :-1]
    mask_probs = masks.sigmoid()
    pooled = _coco_classes(lut, torch.einsum("qc,qhw->chw", class_probs, F.adaptive_avg_pool2d(mask_probs[None], SEG_CELLS)[0]), 0)
    per_pixel = (mask_probs.flatten(1).T @ _coco_classes(lut, class_probs, 1)).reshape(*masks.shape[1:], NUM_CLASSES)
    return pooled.cpu().numpy(), np.moveaxis(per_pixel.cpu().numpy(), -1, 0)


def _coco_classes(lut: np.ndarray, model_probs: torch.Tensor, dim: int) -> torch.Tensor:
    """``model_probs`` with its model classes (along ``dim``) summed into the COCO classes they map
    to, in model-class order (as ``np.add.at``), vectorised: round k adds the k-th model class of
    every COCO class at once, so a one-to-one label set takes one round."""
    shape = list(model_probs.shape)
    shape[dim] = NUM_CLASSES
    out = model_probs.new_zeros(shape)
    targets = lut[: model_probs.shape[dim]].astype(np.int64)
    remaining = np.flatnonzero(targets != VOID)
    while remaining.size:
        _, first = np.unique(targets[remaining], return_index=True)
        taken = remaining[first]
        out.index_add_(dim, torch.from_numpy(targets[taken]).to(out.device), model_probs.index_select(dim, torch.from_numpy(taken).to(out.device)))
        remaining = np.delete(remaining, first)
    return out
