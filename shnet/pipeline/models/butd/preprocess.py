"""Each checkpoint's input as its own extractor makes it: BGR minus the caffe pixel means (no std),
shortest side ``min_size``, longest at most ``max_size``. The two published extractors resize
differently, and the features follow the pixels, so each convention keeps its own:

``caffe`` (MILVLG, Caffe ``generate_tsv.py``): the means subtracted from the float image first, then
cv2 bilinear with one scale for both axes (cv2 rounds the output size); boxes map back by that scale.

``d2`` (py-bottom-up-attention, detectron2's ``ResizeShortestEdge``): the output size computed in
floats and rounded as ``int(x + 0.5)``, the uint8 image resized by PIL bilinear (antialiased when
shrinking), then converted to float and the means subtracted; boxes map per axis by the actual
size ratio (detectron2's ``detector_postprocess``, the given-box demo's ``scale_x``, ``scale_y``).

Boxes map back as the image was resized, whichever selection chose them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from . import box_coder

PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)


@dataclass
class PreparedImage:
    image: np.ndarray  # [3, h, w] float32, BGR minus the pixel means
    convention: str  # whose extractor prepared it: "caffe" or "d2"
    scale: tuple[float, float]  # (x, y): resized / original
    original_hw: tuple[int, int]
    given_boxes: np.ndarray | None = None  # [G, 4] in original pixels (regions.boxes mode)
    clipped_boxes: int = 0  # how many of the given boxes reached past the image and were clipped

    @property
    def resized_hw(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[2]

    def to_resized(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes [N, 4] in original pixels on the resized image (both extractors multiply by the scale)."""
        return boxes * boxes.new_tensor(self.scale * 2)

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes [N, 4] of the resized image in original pixels, as the image's extractor maps them:
        MILVLG divides by its one scale; detectron2 multiplies by original / resized per axis and clips."""
        if self.convention == "caffe":
            return boxes / boxes.new_tensor(self.scale * 2)
        (height, width), (resized_h, resized_w) = self.original_hw, self.resized_hw
        return box_coder.clip(boxes * boxes.new_tensor([width / resized_w, height / resized_h] * 2), height, width, plus_one=False)


def caffe_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """MILVLG's scale: shortest side to ``min_size`` unless the rounded longest would pass ``max_size``."""
    scale = float(min_size) / min(height, width)
    if np.round(scale * max(height, width)) > max_size:
        scale = float(max_size) / max(height, width)
    return scale


def d2_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge`` output (height, width)."""
    scale = min_size / min(height, width)
    new_h, new_w = (float(min_size), scale * width) if height < width else (scale * height, float(min_size))
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def preprocess(rgb: np.ndarray, min_size: int, max_size: int, convention: str) -> PreparedImage:
    """An RGB uint8 image [H,W,3] as the extractor of ``convention`` ("caffe" or "d2") feeds it."""
    return _PREPROCESS[convention](rgb, min_size, max_size)


def _caffe(rgb: np.ndarray, min_size: int, max_size: int) -> PreparedImage:
    height, width = rgb.shape[:2]
    scale = caffe_scale(height, width, min_size, max_size)
    bgr = rgb[:, :, ::-1].astype(np.float32) - np.asarray(PIXEL_MEANS_BGR, np.float32)
    resized = cv2.resize(bgr, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return PreparedImage(np.ascontiguousarray(resized.transpose(2, 0, 1)), "caffe", (scale, scale), (height, width))


def _d2(rgb: np.ndarray, min_size: int, max_size: int) -> PreparedImage:
    height, width = rgb.shape[:2]
    new_h, new_w = d2_size(height, width, min_size, max_size)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    bgr = resized[:, :, ::-1].astype(np.float32) - np.asarray(PIXEL_MEANS_BGR, np.float32)
    return PreparedImage(np.ascontiguousarray(bgr.transpose(2, 0, 1)), "d2", (new_w / width, new_h / height), (height, width))


_PREPROCESS = {"caffe": _caffe, "d2": _d2}
