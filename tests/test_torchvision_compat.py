"""shnet's CPU fallbacks for torchvision's nms / roi_align / roi_pool, against reference values.

The references below are straightforward transcriptions of torchvision's C++ CPU kernels (scalar
loops), plus hand-computed values. Where torchvision's own kernels load, the fallbacks are not
installed and these tests check torchvision itself against the same references.
"""

import math

import numpy as np
import pytest
import torch

from shnet.torchvision_compat import ensure_torchvision, nms, roi_align, roi_pool, using_fallback_ops

torchvision = ensure_torchvision()


def reference_nms(boxes, scores, threshold):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    suppressed = set()
    keep = []
    b = boxes.tolist()
    for a, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[a + 1 :]:
            if j in suppressed:
                continue
            xx1, yy1 = max(b[i][0], b[j][0]), max(b[i][1], b[j][1])
            xx2, yy2 = min(b[i][2], b[j][2]), min(b[i][3], b[j][3])
            inter = max(0.0, xx2 - xx1) * max(0.0, yy2 - yy1)
            area_i = (b[i][2] - b[i][0]) * (b[i][3] - b[i][1])
            area_j = (b[j][2] - b[j][0]) * (b[j][3] - b[j][1])
            if inter / (area_i + area_j - inter) > threshold:
                suppressed.add(j)
    return keep


def _bilinear(feature, y, x):
    height, width = feature.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def reference_roi_align(inp, rois, scale, ph_, pw_, sampling, aligned):
    inp = inp.double().numpy()
    out = np.zeros((len(rois), inp.shape[1], ph_, pw_))
    for r, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        offset = 0.5 if aligned else 0.0
        sw, sh = x1 * scale - offset, y1 * scale - offset
        rw, rh = x2 * scale - offset - sw, y2 * scale - offset - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_, rw / pw_
        gh = sampling if sampling > 0 else math.ceil(rh / ph_)
        gw = sampling if sampling > 0 else math.ceil(rw / pw_)
        count = max(gh * gw, 1)
        for ph in range(ph_):
            for pw in range(pw_):
                acc = np.zeros(inp.shape[1])
                for iy in range(gh):
                    y = sh + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sw + pw * bw + (ix + 0.5) * bw / gw
                        acc += _bilinear(inp[int(b)], y, x)
                out[r, :, ph, pw] = acc / count
    return torch.from_numpy(out)


def reference_roi_pool(inp, rois, scale, ph_, pw_):
    inp = inp.double().numpy()
    height, width = inp.shape[-2:]
    out = np.zeros((len(rois), inp.shape[1], ph_, pw_))
    for r, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        sw, sh, ew, eh = (int(round(v * scale)) for v in (x1, y1, x2, y2))
        rw, rh = max(ew - sw + 1, 1), max(eh - sh + 1, 1)
        bh, bw = rh / ph_, rw / pw_
        for ph in range(ph_):
            for pw in range(pw_):
                hs = min(max(int(math.floor(ph * bh)) + sh, 0), height)
                he = min(max(int(math.ceil((ph + 1) * bh)) + sh, 0), height)
                ws = min(max(int(math.floor(pw * bw)) + sw, 0), width)
                we = min(max(int(math.ceil((pw + 1) * bw)) + sw, 0), width)
                if he <= hs or we <= ws:
                    continue
                out[r, :, ph, pw] = inp[int(b), :, hs:he, ws:we].reshape(inp.shape[1], -1).max(1)
    return torch.from_numpy(out)


def random_rois(generator, n, batch, height, width):
    x1 = torch.rand(n, generator=generator) * width * 1.2 - 0.1 * width
    y1 = torch.rand(n, generator=generator) * height * 1.2 - 0.1 * height
    w = torch.rand(n, generator=generator) * width * 0.8 + 0.1
    h = torch.rand(n, generator=generator) * height * 0.8 + 0.1
    b = torch.randint(0, batch, (n,), generator=generator).float()
    return torch.stack([b, x1, y1, x1 + w, y1 + h], 1)


def test_import_of_torchvision_and_timm_works():
    import timm

    assert hasattr(torchvision.ops, "nms")
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        pooled = model(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert pooled.shape == (2, 512) and torch.isfinite(pooled).all()  # the trunk runs: pooled features, no head


def test_nms_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (0.95) suppresses its duplicate 0 (IoU 1) and box 1 (IoU 81/119 = 0.68 > 0.5); 2 is apart
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert torchvision.ops.nms(boxes, scores, 0.7).tolist() == [3, 1, 2]
    assert torchvision.ops.batched_nms(boxes, scores, torch.tensor([0, 1, 0, 0]), 0.5).tolist() == [3, 1, 2]
    assert torchvision.ops.nms(torch.zeros((0, 4)), torch.zeros(0), 0.5).numel() == 0


def test_nms_compares_the_threshold_in_double():
    """The kernel compares each float32 IoU with the double threshold: an IoU of exactly 0.25 is above
    0.25 - 1e-12, although that threshold's nearest float32 is 0.25 itself."""
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 40], [50, 50, 60, 60.0]])  # IoU(0, 1) = 100 / 400
    scores = torch.tensor([0.9, 0.8, 0.7])
    for run in (torchvision.ops.nms, nms):
        assert run(boxes, scores, 0.25).tolist() == [0, 1, 2]
        assert run(boxes, scores, 0.25 - 1e-12).tolist() == [0, 2]
        assert run(boxes.double(), scores.double(), 0.25 - 1e-12).tolist() == [0, 2]


@pytest.mark.parametrize("n,threshold", [(50, 0.3), (400, 0.5), (1500, 0.7)])
def test_nms_matches_reference(n, threshold):
    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    assert torchvision.ops.nms(boxes, scores, threshold).tolist() == reference_nms(boxes, scores, threshold)
    assert nms(boxes, scores, threshold).tolist() == reference_nms(boxes, scores, threshold)


def test_roi_align_hand_computed():
    feature = torch.arange(16.0).reshape(1, 1, 4, 4)  # value = 4*y + x
    # aligned box over pixel centres (0.5..2.5) -> one sample at the centre (1.5 - 0.5 = 1.0): value 4*1+1
    out = torchvision.ops.roi_align(feature, torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]]), (1, 1), 1.0, 1, True)
    assert out.item() == pytest.approx(5.0)
    # aligned box [0,0,4,4] in 2x2 bins, 2x2 samples each: sample rows/cols {0,1} and {2,3}, whose
    # means 0.5 and 2.5 a linear map reproduces exactly
    out = torchvision.ops.roi_align(feature, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), (2, 2), 1.0, 2, True)
    expected = torch.tensor([[[[0.5 * 4 + 0.5, 0.5 * 4 + 2.5], [2.5 * 4 + 0.5, 2.5 * 4 + 2.5]]]])
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [0, 2])
def test_roi_align_matches_reference(aligned, sampling):
    g = torch.Generator().manual_seed(7)
    feature = torch.randn(2, 3, 9, 11, generator=g)
    rois = random_rois(g, 12, 2, 9 / 0.5, 11 / 0.5)
    got = torchvision.ops.roi_align(feature, rois, (3, 4), 0.5, sampling, aligned)
    want = reference_roi_align(feature, rois, 0.5, 3, 4, sampling, aligned)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_roi_align_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    feature = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.double, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.2, 4.1, 3.7], [0, 1.0, 1.5, 5.5, 4.5]], dtype=torch.double)
    assert torch.autograd.gradcheck(lambda f: torchvision.ops.roi_align(f, rois, (2, 2), 1.0, 0, True), (feature,))


def test_roi_pool_matches_reference():
    g = torch.Generator().manual_seed(11)
    feature = torch.randn(2, 3, 10, 8, generator=g)
    rois = random_rois(g, 15, 2, 10 / 0.25, 8 / 0.25)
    got = torchvision.ops.roi_pool(feature, rois, (3, 2), 0.25)
    want = reference_roi_pool(feature, rois, 0.25, 3, 2)
    assert torch.allclose(got.double(), want, atol=1e-6)
    out, argmax = torch.ops.torchvision.roi_pool(feature, rois, 0.25, 3, 2)
    flat = feature.flatten(2)
    batch = rois[:, 0].long()
    gathered = torch.stack([flat[b].gather(1, a.clamp(min=0).flatten(1)).view_as(a) for b, a in zip(batch, argmax)])
    assert torch.equal(torch.where(argmax >= 0, gathered, torch.zeros_like(gathered)), out)


def test_fallbacks_are_direct_functions_too():
    g = torch.Generator().manual_seed(5)
    feature = torch.randn(1, 2, 6, 6, generator=g)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 5.0]])
    assert torch.allclose(roi_align(feature, rois, 1.0, 2, 2, 2, False), reference_roi_align(feature, rois, 1.0, 2, 2, 2, False).float(), atol=1e-5)
    assert torch.allclose(roi_pool(feature, rois, 1.0, 2, 2)[0], reference_roi_pool(feature, rois, 1.0, 2, 2).float())


def _ops_in_worker():
    import torch

    from shnet.torchvision_compat import ensure_torchvision, using_fallback_ops

    tv = ensure_torchvision()
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
    keep = tv.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    pooled = tv.ops.roi_align(torch.arange(16.0).reshape(1, 1, 4, 4), torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]]), (1, 1), 1.0, 1, True)
    return keep, pooled.item(), using_fallback_ops()


def test_ops_work_inside_dask_worker_processes():
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        keep, pooled, fallback = client.submit(_ops_in_worker).result(timeout=120)
    assert keep == [0, 2]
    assert pooled == pytest.approx(5.0)
    assert fallback == using_fallback_ops()


def test_nothing_is_registered_when_the_extension_loads():
    """Where torchvision's own kernels load, ensure_torchvision must change nothing: simulate that
    verdict in a fresh interpreter and check no operator was defined by shnet."""
    import subprocess
    import sys

    code = (
        "import torch, shnet.torchvision_compat as c\n"
        "c._extension_loads = lambda: True\n"
        "try:\n"
        "    c.ensure_torchvision()\n"
        "except RuntimeError as exc:\n"
        "    print('import failed:', exc)\n"
        "print('library', c._STATE['library'], 'fallback', c._STATE['fallback'])\n"
        "print('nms kernel', torch._C._dispatch_has_kernel('torchvision::nms'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "library None fallback False" in out
    if using_fallback_ops():  # this machine's torchvision cannot load without shnet's help
        assert "operator torchvision::nms does not exist" in out
        assert "nms kernel False" in out


def test_torchvision_imports_without_dynamo_and_its_compile_check_still_answers():
    """torchvision's roi_align module imports TorchDynamo for one check it makes only on its
    torch.compile path; importing torchvision through shnet, and building a torchvision grid
    backbone, leave dynamo (and timm, which imports it) unloaded until that check runs, and the
    check then answers as dynamo's own does."""
    import subprocess
    import sys

    code = (
        "import sys, shnet.torchvision_compat as c\n"
        "c.ensure_torchvision()\n"
        "from shnet.pipeline.models.grid import build_grid_backbone\n"
        "build_grid_backbone('resnet18', 'random')\n"
        "print('dynamo loaded', 'torch._dynamo' in sys.modules or 'timm' in sys.modules)\n"
        "check = sys.modules['torchvision.ops.roi_align'].is_compile_supported\n"
        "answers = [check('cpu'), check('meta')]\n"
        "from torch._dynamo.utils import is_compile_supported\n"
        "print('same answers', answers == [is_compile_supported('cpu'), is_compile_supported('meta')])\n"
        "print('real module', sys.modules['torch._dynamo.utils'].__file__ is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[:3] == ["dynamo loaded False", "same answers True", "real module True"], out.stderr[-2000:]
