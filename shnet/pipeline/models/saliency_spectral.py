"""Weights-free saliency: the spectral residual of Hou & Zhang (CVPR 2007), as OpenCV contrib computes it.

OpenCV analyses a 64x64 grey image; shrinking to that size here with area interpolation (rather
than letting OpenCV subsample the full image) avoids aliasing and keeps work independent of the
image size.
"""

from __future__ import annotations

import cv2
import numpy as np

ANALYSIS_SIZE = 64


def spectral_residual_saliency(rgb_uint8: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Saliency ``[h, w]`` float32 in [0,1] (min-max normalised) of an RGB ``[H,W,3]`` uint8 image,
    at ``out_size = (h, w)``. Deterministic; a flat image gives all zeros.

    A flat image has no spectrum beyond its mean, so its residual is rounding noise (or NaN from
    ``log(0)``); it is answered with zeros instead of that noise stretched to [0,1].
    """
    out_h, out_w = out_size
    grey = cv2.cvtColor(rgb_uint8, cv2.COLOR_RGB2GRAY)
    grey = _resize(grey, (ANALYSIS_SIZE, ANALYSIS_SIZE))
    if grey.min() == grey.max():
        return np.zeros((out_h, out_w), np.float32)
    ok, saliency = cv2.saliency.StaticSaliencySpectralResidual_create().computeSaliency(grey)
    if not ok:
        return np.zeros((out_h, out_w), np.float32)
    saliency = np.nan_to_num(saliency.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    saliency = _resize(saliency, (out_h, out_w))
    low, high = float(saliency.min()), float(saliency.max())
    if high - low <= 1e-12:
        return np.zeros((out_h, out_w), np.float32)
    return ((saliency - low) / (high - low)).astype(np.float32)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
