"""bfloat16 as exact search uses it: values rounded to bfloat16 kept as little-endian uint16 bits
(numpy has no bfloat16; torch multiplies them), rounded to nearest or upward (an upward-rounded
bound stays a bound), and the error bound of a bfloat16 matrix product.
"""

from __future__ import annotations

import numpy as np

UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits, round to nearest)


def screen_error(dimension: int) -> float:
    """The error of one bfloat16 product of two length-``dimension`` vectors, per unit of
    ``|q| |x|``: rounding q and x to bfloat16, float32 accumulation, the bfloat16 result
    (``3 u + 4 u^2`` with u = 2^-8, and float32 accumulation's D 2^-24 doubled for margin)."""
    return 3 * UNIT + 4 * UNIT**2 + 2 * dimension * 2.0**-24


def bfloat16_bits(matrix: np.ndarray) -> np.ndarray:
    """Floats -> their bfloat16 values (round to nearest even) as little-endian uint16 bits."""
    import torch

    values = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)).bfloat16()
    return values.view(torch.int16).numpy().view("<u2")


def float32_up(values: np.ndarray) -> np.ndarray:
    """float64 values -> the least float32 values not below them."""
    values = np.asarray(values, dtype=np.float64)
    out = values.astype(np.float32)
    low = out.astype(np.float64) < values
    out[low] = np.nextafter(out[low], np.float32(np.inf))
    return out


def bfloat16_bits_up(values: np.ndarray) -> np.ndarray:
    """Non-negative float64 values -> the bits of the least bfloat16 values not below them."""
    bits = float32_up(values).view(np.uint32)
    upper = (bits >> 16).astype(np.uint32)
    upper += (bits & 0xFFFF) != 0  # anything cut off: the next bfloat16 up (for non-negative values)
    return upper.astype("<u2")


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> their values as float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)
