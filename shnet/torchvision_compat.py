"""Make torchvision importable when its compiled operators cannot load.

The torchvision wheel that matches a CPU-only torch is sometimes a CUDA build whose ``_C``
extension cannot be loaded; torchvision's import then dies with "operator torchvision::nms does
not exist", and so do timm and transformers' vision models, which import it. When (and only when)
that extension fails to load, :func:`ensure_torchvision` defines the ``torchvision::nms``,
``roi_align`` and ``roi_pool`` operators with CPU-capable implementations written on plain torch
ops, then imports torchvision and points its Python wrappers at them. On a working install it
imports torchvision and changes nothing.

Call it before the first ``import torchvision`` / ``timm`` / ``transformers`` model import in any
process (Dask workers included): :mod:`shnet.pipeline.models` does so on import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import types

import numpy as np
import torch
import torch.nn.functional as F

_LOCK = threading.Lock()
_STATE: dict = {"checked": False, "fallback": False, "library": None}


def _extension_loads() -> bool:
    """Whether torchvision's compiled ``_C`` extension loads (the test torchvision itself makes)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision at all: nothing to patch, the import error is torchvision's own
    if hasattr(torch.ops, "torchvision") and _op_exists("nms"):
        return True
    folder = spec.submodule_search_locations[0]
    candidates = [f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
    except (OSError, ImportError, RuntimeError):
        return False
    return _op_exists("nms")


def _op_exists(name: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel(f"torchvision::{name}"))
    except RuntimeError:
        return False


def nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression with torchvision's semantics (IoU > threshold suppresses).

    Overlaps are computed in the boxes' dtype, as the kernel does, for the upper triangle only and
    in row blocks that stay in cache; the greedy pass then runs over the boolean overlap rows. The
    kernel compares each IoU with the threshold in double precision: the same test in the boxes'
    dtype needs the threshold rounded down to that dtype, not to the nearest value.
    """
    n = dets.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    iou_threshold = _round_down(iou_threshold, dets.dtype)
    order = torch.sort(scores, descending=True, stable=True).indices
    x1, y1, x2, y2 = dets[order].unbind(1)
    area = (x2 - x1) * (y2 - y1)
    over = torch.zeros((n, n), dtype=torch.bool)
    block = 64
    for s in range(0, n, block):
        e = min(s + block, n)
        iw = torch.minimum(x2[s:e, None], x2[None, s:]).sub_(torch.maximum(x1[s:e, None], x1[None, s:])).clamp_(min=0)
        ih = torch.minimum(y2[s:e, None], y2[None, s:]).sub_(torch.maximum(y1[s:e, None], y1[None, s:])).clamp_(min=0)
        inter = iw.mul_(ih)
        union = (area[s:e, None] + area[None, s:]).sub_(inter)
        over[s:e, s:] = inter.div_(union).gt_(iou_threshold).cpu()
    over_rows = over.numpy()
    suppressed = np.zeros(n, dtype=bool)
    for i in range(n):
        if not suppressed[i]:
            over_rows[i, : i + 1] = False
            suppressed |= over_rows[i]
    return order[torch.from_numpy(~suppressed).to(dets.device)]


def _round_down(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number not above ``value``: for x of that dtype, x > it exactly when x > value."""
    exact = torch.tensor(value, dtype=torch.float64)
    rounded = exact.to(dtype)
    if rounded.double() > exact:
        rounded = torch.nextafter(rounded, torch.tensor(float("-inf"), dtype=dtype))
    return rounded.item()


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign with the exact sampling rule of torchvision's kernel, built on ``grid_sample``.

    RoIs are grouped by image and by their (adaptive) sampling grid so each group is one
    ``grid_sample`` call; gradients flow through it.
    """
    num_rois = rois.shape[0]
    channels, height, width = input.shape[1:]
    out = input.new_zeros((num_rois, channels, pooled_height, pooled_width))
    if num_rois == 0:
        return out
    rois = rois.to(input.dtype)
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_w
    roi_h = rois[:, 4] * spatial_scale - offset - start_h
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / pooled_height
    bin_w = roi_w / pooled_width
    if sampling_ratio > 0:
        grid_h = torch.full((num_rois,), sampling_ratio, dtype=torch.long)
        grid_w = grid_h.clone()
    else:
        grid_h = torch.ceil(roi_h / pooled_height).long().cpu()
        grid_w = torch.ceil(roi_w / pooled_width).long().cpu()
    batch_index = rois[:, 0].long().cpu()
    keys = torch.stack([batch_index, grid_h, grid_w], 1)
    groups, inverse = torch.unique(keys, dim=0, return_inverse=True)
    results = []
    for g, (b, gh, gw) in enumerate(groups.tolist()):
        idx = (inverse == g).nonzero().flatten().to(input.device)
        gh_eff, gw_eff = max(gh, 1), max(gw, 1)
        iy = (torch.arange(gh_eff, device=input.device, dtype=input.dtype) + 0.5) / max(gh, 1)
        ix = (torch.arange(gw_eff, device=input.device, dtype=input.dtype) + 0.5) / max(gw, 1)
        ph = torch.arange(pooled_height, device=input.device, dtype=input.dtype)
        pw = torch.arange(pooled_width, device=input.device, dtype=input.dtype)
        # sample coordinates [k, PH, gh] and [k, PW, gw]
        y = start_h[idx, None, None] + (ph[None, :, None] + iy[None, None, :]) * bin_h[idx, None, None]
        x = start_w[idx, None, None] + (pw[None, :, None] + ix[None, None, :]) * bin_w[idx, None, None]
        k = idx.numel()
        y = y.reshape(k, pooled_height * gh_eff)
        x = x.reshape(k, pooled_width * gw_eff)
        ymask = (y >= -1.0) & (y <= height)
        xmask = (x >= -1.0) & (x <= width)
        yn = _normalise(y.clamp(0, height - 1), height)
        xn = _normalise(x.clamp(0, width - 1), width)
        grid = torch.stack(
            [xn[:, None, :].expand(k, yn.shape[1], xn.shape[1]), yn[:, :, None].expand(k, yn.shape[1], xn.shape[1])],
            dim=-1,
        )
        feat = input[b : b + 1].expand(k, channels, height, width)
        sampled = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=True)
        mask = (ymask[:, :, None] & xmask[:, None, :]).to(input.dtype)[:, None]
        sampled = sampled * mask
        pooled = sampled.reshape(k, channels, pooled_height, gh_eff, pooled_width, gw_eff).sum((3, 5))
        count = max(gh * gw, 1)
        results.append((idx, pooled / count))
    for idx, pooled in results:
        out = out.index_copy(0, idx, pooled)
    return out


def _normalise(coord: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return torch.zeros_like(coord)
    return coord * (2.0 / (size - 1)) - 1.0


def roi_pool(
    input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIPool (Fast R-CNN max pooling over quantised bins), as torchvision's kernel computes it.

    Each RoI's bins are exactly those of ``adaptive_max_pool2d`` over the RoI's rounded extent; the
    parts of the extent outside the feature map are padded with -inf so they never win, and bins
    that fall wholly outside give 0 (argmax -1), as in the kernel.
    """
    num_rois = rois.shape[0]
    channels, height, width = input.shape[1:]
    out = input.new_zeros((num_rois, channels, pooled_height, pooled_width))
    argmax = torch.full((num_rois, channels, pooled_height, pooled_width), -1, dtype=torch.long, device=input.device)
    coords = torch.round(rois[:, 1:].double() * spatial_scale).long().tolist()
    batch_index = rois[:, 0].long().tolist()
    pieces = []
    for r, ((x1, y1, x2, y2), b) in enumerate(zip(coords, batch_index)):
        roi_h = max(y2 - y1 + 1, 1)
        roi_w = max(x2 - x1 + 1, 1)
        padded = input.new_full((channels, roi_h, roi_w), float("-inf"))
        ys, ye = max(y1, 0), min(y1 + roi_h, height)
        xs, xe = max(x1, 0), min(x1 + roi_w, width)
        if ys < ye and xs < xe:
            padded[:, ys - y1 : ye - y1, xs - x1 : xe - x1] = input[b, :, ys:ye, xs:xe]
        values, local = F.adaptive_max_pool2d(padded[None], (pooled_height, pooled_width), return_indices=True)
        values, local = values[0], local[0]
        empty = torch.isinf(values)
        ly, lx = local // roi_w, local % roi_w
        flat = (ly + y1) * width + (lx + x1)
        pieces.append((r, values.masked_fill(empty, 0.0), flat.masked_fill(empty, -1)))
    if pieces:
        idx = torch.as_tensor([p[0] for p in pieces], device=input.device)
        out = out.index_copy(0, idx, torch.stack([p[1] for p in pieces]))
        argmax = argmax.index_copy(0, idx, torch.stack([p[2] for p in pieces]))
    return out, argmax


def _unavailable(name: str):
    def kernel(*args, **kwargs):
        raise RuntimeError(
            f"torchvision::{name} needs torchvision's compiled extension, which cannot load with this "
            "torch build; shnet provides CPU fallbacks for nms, roi_align and roi_pool only"
        )

    return kernel


def _register_fallback_ops() -> torch.library.Library:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    )
    lib.define(
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    )
    lib.impl("nms", nms, "CompositeExplicitAutograd")
    lib.impl("qnms", _unavailable("qnms"), "CompositeExplicitAutograd")
    lib.impl("roi_align", roi_align, "CompositeImplicitAutograd")
    lib.impl("roi_pool", roi_pool, "CompositeImplicitAutograd")
    return lib


def _point_wrappers_at_fallbacks() -> None:
    import importlib

    def _ops_present() -> None:
        return None

    # the package re-exports functions named like these modules, so go through sys.modules
    for name in ("boxes", "roi_align", "roi_pool"):
        module = importlib.import_module(f"torchvision.ops.{name}")
        module._assert_has_ops = _ops_present
    importlib.import_module("torchvision.ops.roi_align")._has_ops = lambda: True


def ensure_torchvision():
    """Import torchvision, first installing CPU operator fallbacks if its extension cannot load.

    Returns the torchvision module. Idempotent and thread-safe.
    """
    with _LOCK:
        if not _STATE["checked"]:
            if not _extension_loads():
                _STATE["library"] = _register_fallback_ops()
                _STATE["fallback"] = True
            _STATE["checked"] = True
            _import_torchvision_without_dynamo()
            if _STATE["fallback"]:
                _point_wrappers_at_fallbacks()
    import torchvision

    return torchvision


DEFERRED_MODULE = "torch._dynamo.utils"


def _import_torchvision_without_dynamo() -> None:
    """Import torchvision without importing TorchDynamo. ``torchvision.ops.roi_align`` imports
    ``torch._dynamo.utils`` for one function, ``is_compile_supported``, which it calls only on its
    ``torch.compile`` path (its own comment says it means not to import dynamo eagerly); importing
    dynamo costs 1.1 s of CPU in every process that imports torchvision, i.e. in each extract worker
    and the extract itself, on the cores the workers start on. While torchvision imports, that
    module's name resolves to a stand-in whose ``is_compile_supported`` imports the real one when it
    is first called; afterwards the name is free again for the real module."""
    if DEFERRED_MODULE in sys.modules or "torchvision" in sys.modules:
        import torchvision  # noqa: F401
        return
    stand_in = types.ModuleType(DEFERRED_MODULE)

    def is_compile_supported(device_type):
        from torch._dynamo.utils import is_compile_supported as real

        return real(device_type)

    stand_in.is_compile_supported = is_compile_supported
    sys.modules[DEFERRED_MODULE] = stand_in
    try:
        import torchvision  # noqa: F401
    finally:
        if sys.modules.get(DEFERRED_MODULE) is stand_in:
            del sys.modules[DEFERRED_MODULE]


def using_fallback_ops() -> bool:
    """True when this process runs shnet's operator fallbacks instead of torchvision's kernels."""
    ensure_torchvision()
    return bool(_STATE["fallback"])
