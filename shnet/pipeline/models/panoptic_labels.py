"""A panoptic model's label set matched to the COCO panoptic classes (index 0..132 of every stored map).

Names match exactly first, then after normalisation (case; ``-merged``, ``-other``, ``-stuff``
suffixes; spaces, underscores and hyphens). A label that matches nothing refuses the run unless a
label-map file (``panoptic.label_map``: JSON or YAML ``{model_label: coco_name_or_index}``) maps it;
a label that should become void must be mapped to ``null`` explicitly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import yaml

from ...data import coco_panoptic_categories
from ...errors import ShnetError
from ...cache.schema import VOID

_SUFFIXES = ("-merged", "-other", "-stuff")


def normalise_label(name: str) -> str:
    text = re.sub(r"[\s_\-]+", "-", str(name).strip().lower())
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if text.endswith(suffix):
                text = text[: -len(suffix)]
                changed = True
    return re.sub(r"[\s_\-]+", "", text)


def read_label_map(path: str | None) -> dict[str, object]:
    """The user's {model_label: coco name, index or null} file ({} when none is given)."""
    if path is None:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise ShnetError(f"panoptic.label_map: no file {file}; give a JSON or YAML file of {{model_label: coco_name_or_index}}")
    try:
        data = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ShnetError(f"panoptic.label_map {file} is not valid JSON/YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ShnetError(f"panoptic.label_map {file} must be a mapping {{model_label: coco_name_or_index}}")
    return {str(k): v for k, v in data.items()}


def coco_index_of(value: object, source: str) -> int:
    """A COCO class given by name or index (0..132) in a label map, or VOID for null."""
    categories = coco_panoptic_categories()
    if value is None:
        return VOID
    if isinstance(value, bool):
        raise ShnetError(f"{source}: {value!r} is neither a COCO panoptic class name nor an index 0..132")
    if isinstance(value, int):
        if 0 <= value < len(categories):
            return value
        raise ShnetError(f"{source}: class index {value} is outside 0..{len(categories) - 1}")
    by_name = {c.name: c.index for c in categories}
    by_norm = {normalise_label(c.name): c.index for c in categories}
    text = str(value)
    if text in by_name:
        return by_name[text]
    if normalise_label(text) in by_norm:
        return by_norm[normalise_label(text)]
    raise ShnetError(f"{source}: {text!r} is not a COCO panoptic class name (see shnet.data.coco_panoptic_categories())")


def match_labels(id2label: Mapping[int, str], label_map: Mapping[str, object], source: str, label_map_path: str | None) -> np.ndarray:
    """Lookup table model label id -> COCO class index (VOID for labels mapped to null).

    Refuses, naming them, labels that neither match a COCO name nor appear in the label map.
    """
    categories = coco_panoptic_categories()
    by_name = {c.name: c.index for c in categories}
    by_norm = {normalise_label(c.name): c.index for c in categories}
    size = max(int(k) for k in id2label) + 1 if id2label else 0
    lut = np.full(size, VOID, dtype=np.int64)
    unmatched = []
    for key, label in sorted(((int(k), str(v)) for k, v in id2label.items())):
        if label in label_map or str(key) in label_map:
            value = label_map[label] if label in label_map else label_map[str(key)]
            lut[key] = coco_index_of(value, f"panoptic.label_map {label_map_path}, label {label!r}")
        elif label in by_name:
            lut[key] = by_name[label]
        elif normalise_label(label) in by_norm:
            lut[key] = by_norm[normalise_label(label)]
        else:
            unmatched.append(label)
    if unmatched:
        shown = ", ".join(repr(u) for u in unmatched[:20]) + (f" and {len(unmatched) - 20} more" if len(unmatched) > 20 else "")
        raise ShnetError(
            f"{source} has {len(unmatched)} label(s) that match no COCO panoptic class: {shown}. "
            "Map them with --set panoptic.label_map=FILE (JSON/YAML {model_label: coco_name_or_index, or null for void})"
        )
    return lut
