"""``grid.model=butd-r101`` (here its R-50 sibling, for speed): the detector's backbone + VG res5 over
the whole image, loading the detector's own checkpoint."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from shnet.pipeline.models.butd.backbone import FrozenBatchNorm2d
from shnet.pipeline.models.butd.conventions import CAFFE
from shnet.pipeline.models.butd.detector import BUTDDetector
from shnet.pipeline.models.butd.preprocess import preprocess
from shnet.pipeline.models.grid import build_grid_backbone
from shnet.pipeline.models.grid import preprocess as grid_preprocess


def milvlg_checkpoint(path) -> BUTDDetector:
    """A detector with non-trivial frozen BN, saved as bottom-up-attention.pytorch names it."""
    torch.manual_seed(3)
    detector = BUTDDetector(50, CAFFE).eval()
    state = {}
    with torch.no_grad():
        for module in detector.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.2, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for key, value in detector.state_dict().items():
            state[key.replace("box_predictor.cls_embedding.", "box_predictor.cls_embed.")] = value
            if key.endswith("norm.running_mean") and ".res4." in key:
                state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    torch.save({"model": state}, path)
    return detector


def test_grid_trunk_is_the_detectors_res5_over_the_whole_image(tmp_path, single_torch_thread):
    detector = milvlg_checkpoint(tmp_path / "bua.pth")
    trunk = build_grid_backbone("butd-r50", str(tmp_path / "bua.pth"))
    assert (trunk.channels, trunk.stride) == (2048, 16)
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    image, valid = grid_preprocess(rgb, 64, "stretch", trunk.mean, trunk.std, trunk.stride)
    caffe_input = preprocess(rgb, 64, 64, "caffe")  # 64x64 stays 64x64: the same pixels, BGR minus caffe means
    with torch.inference_mode():
        grid = trunk(torch.from_numpy(image)[None])
        expected = detector.roi_heads.res5(detector.backbone(torch.from_numpy(caffe_input.image)[None]))
    assert grid.shape == (1, 2048, 4, 4) and valid == (4, 4)
    torch.testing.assert_close(grid, expected, rtol=1e-4, atol=1e-4)


def test_grid_stage_runs_the_butd_trunk(photo_dir, tmp_path, extract):
    milvlg_checkpoint(tmp_path / "bua.pth")
    cache = tmp_path / "cache"
    extract(photo_dir, "-o", cache, "--stages", "grid",
            "--set", "grid.model=butd-r50", "--set", f"grid.weights={tmp_path / 'bua.pth'}", "--set", "grid.input_size=64")  # fmt: skip
    with h5py.File(cache / "grid" / "00000.h5") as fh:
        grid = fh["grid"][:]
        assert fh.attrs["model"] == "butd-r50" and fh.attrs["stride"] == 16
    assert grid.shape == (7, 4, 4, 2048) and np.isfinite(grid.astype(np.float32)).all() and grid.any()
