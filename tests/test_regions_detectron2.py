"""``regions.backend=detectron2``: detectron2 itself runs the network where it is importable (with
py-bottom-up-attention's VG modifications) and gives what the native backend gives."""

from __future__ import annotations

import contextlib
import importlib.util
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shnet.cli import main
from shnet.pipeline.models.butd.conventions import D2
from shnet.pipeline.models.butd.detector import BUTDDetector
from shnet.pipeline.models.butd.preprocess import preprocess
from shnet.pipeline.models.butd.extract import SelectionOptions, extract_regions

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None


@pytest.mark.skipif(HAS_DETECTRON2, reason="detectron2 is importable here")
def test_backend_without_detectron2_is_refused_with_one_message(photo_dir, tmp_path):
    args = ["extract", str(photo_dir), "-o", str(tmp_path / "cache"), "--stages", "regions", "--profile", "butd-36",
            "--set", "regions.weights=random", "--set", "regions.backend=detectron2"]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1
    assert "regions.backend=detectron2 needs detectron2 importable" in result.output and "Traceback" not in result.output


def test_detectron2_backend_matches_the_native_detector(tmp_path, single_torch_thread):
    pytest.importorskip("detectron2")
    from shnet.pipeline.models.butd.weights import build_detector
    from shnet.pipeline.models.butd.detectron2_backend import Detectron2Detector

    torch.manual_seed(5)
    native = BUTDDetector(50, D2).eval()
    with open(tmp_path / "d2.pkl", "wb") as fh:
        pickle.dump({"model": {k: v.numpy() for k, v in native.state_dict().items()}}, fh)
    native, _ = build_detector(str(tmp_path / "d2.pkl"), 50, allow_missing_keys=False)
    theirs = Detectron2Detector(str(tmp_path / "d2.pkl"), 50, 6000, 8, 0.7, "cpu", allow_missing_keys=False)
    image = preprocess((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8), 96, 128, "d2")
    options = SelectionOptions("caffe", 4, 4, 0.2, 0.3, 6000, 8, 0.7)
    ours = extract_regions(native, [image], options, contextlib.nullcontext())[0]
    found = extract_regions(theirs, [image], options, contextlib.nullcontext())[0]
    np.testing.assert_allclose(found.boxes, ours.boxes, atol=1e-2)
    np.testing.assert_allclose(found.features, ours.features, rtol=1e-3, atol=1e-3)
