"""Boxes a user gives per image (``regions.boxes=FILE``): ground truth or another detector's boxes.

Accepted files, boxes as x1, y1, x2, y2 in original image pixels, kept in file order:
- JSON: ``{"image_id": [[x1, y1, x2, y2], ...], ...}``;
- Parquet: one row per box with columns ``image_id, x1, y1, x2, y2``, or one row per image with
  columns ``image_id, boxes`` (a list of 4-element lists).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ShnetError
from ..fileio import reading, refuse_control_characters

COORDINATES = ("x1", "y1", "x2", "y2")


def read_given_boxes(path: str | Path) -> dict[str, np.ndarray]:
    """image_id -> [G, 4] float32 boxes; refuses a file it cannot read or boxes that make no sense."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ShnetError(f"regions.boxes file not found: {path}")
    with reading(path, "regions.boxes file", "give a .json {image_id: [[x1, y1, x2, y2], ...]} or a .parquet with image_id, x1, y1, x2, y2"):
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("the top level must be an object mapping image_id to a list of boxes")
            boxes = {str(k): _as_boxes(v) for k, v in raw.items()}
        elif path.suffix.lower() == ".parquet":
            boxes = _from_frame(pd.read_parquet(path))
        else:
            raise ValueError("use a .json or .parquet file")
    for image_id, b in boxes.items():
        refuse_control_characters(image_id, f"regions.boxes file {path}")
        if len(b) and not (np.isfinite(b).all() and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()):
            raise ShnetError(f"regions.boxes file {path}: image {image_id!r} has a box that is not finite x1 <= x2, y1 <= y2")
    return boxes


def _as_boxes(value) -> np.ndarray:
    array = np.asarray([list(b) for b in value], dtype=np.float32) if len(value) else np.zeros((0, 4), np.float32)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError("every box must be 4 numbers x1, y1, x2, y2")
    return array


def _from_frame(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    if "image_id" not in frame:
        raise ValueError("needs an image_id column")
    if "boxes" in frame:
        return {str(i): _as_boxes(list(b)) for i, b in zip(frame["image_id"], frame["boxes"])}
    missing = [c for c in COORDINATES if c not in frame]
    if missing:
        raise ValueError(f"needs columns image_id, x1, y1, x2, y2 (or image_id, boxes); missing {', '.join(missing)}")
    return {
        str(image_id): group[list(COORDINATES)].to_numpy(np.float32)
        for image_id, group in frame.groupby("image_id", sort=False)
    }


def clip_to_image(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Boxes clipped to the image's [0, width] x [0, height]; returns (clipped boxes, how many were
    changed, how many lie wholly outside the image, which no clipping can turn into a region)."""
    outside = (boxes[:, 0] >= width) | (boxes[:, 2] <= 0) | (boxes[:, 1] >= height) | (boxes[:, 3] <= 0)
    clipped = np.stack(
        [np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 1], 0, height), np.clip(boxes[:, 2], 0, width), np.clip(boxes[:, 3], 0, height)], axis=1
    ).astype(np.float32)
    changed = int((clipped != boxes).any(axis=1).sum())
    return clipped, changed, int(outside.sum())
