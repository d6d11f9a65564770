"""The native bottom-up-attention detector: checkpoints of both published conventions loaded by name,
anchors, box arithmetic and box selection against independent computations on hand-made inputs."""

from __future__ import annotations

import ast
import contextlib
import math
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import shnet.pipeline.models  # noqa: F401 - registers the torchvision CPU operators
from shnet.errors import CheckpointMismatchError, ShnetError
from shnet.pipeline.models.butd import box_coder
from shnet.pipeline.models.butd.anchors import cell_anchors, grid_anchors
from shnet.pipeline.models.butd.weights import build_detector, check_detector_weights, detector_for_state, load_state, normalise_names
from shnet.pipeline.models.butd.conventions import CAFFE, D2
from shnet.pipeline.models.butd.detector import BUTDDetector
from shnet.pipeline.models.butd.extract import SelectionOptions, extract_regions
from shnet.pipeline.models.butd.preprocess import caffe_scale, d2_size, preprocess
from shnet.pipeline.models.butd.selection import caffe_keep, d2_detections, max_class_confidence, per_class_detections

KEYS_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "detectron2-r101-c4-vg-faster-rcnn-keys.tsv"
ATTRIBUTE_SHAPES = {"embedding.weight": (1601, 256), "hidden.weight": (512, 2304), "hidden.bias": (512,), "out.weight": (401, 512), "out.bias": (401,)}
PY_BUA_ATTRIBUTES = {"embedding": "cls_embedding", "hidden": "fc_attr", "out": "attr_score"}
MILVLG_ATTRIBUTES = {"embedding": "cls_embed", "hidden": "attr_linear1", "out": "attr_linear2"}


def listed_shapes() -> dict[str, tuple]:
    """detectron2's names and shapes for the R-101 C4 VG detector, from the reference listing
    (or, where the listing is not beside the checkout, from a meta-device d2-convention model)."""
    if KEYS_TSV.exists():
        rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:] if line.strip()]
        return {key: tuple(ast.literal_eval(shape)) for key, shape, _ in rows}
    with torch.device("meta"):
        model = BUTDDetector(101, D2)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".box_predictor.c" not in k or "cls_score" in k}


def published_state(names: dict[str, str], objectness: int, box_classes: int, batches_tracked: bool) -> dict[str, torch.Tensor]:
    """A state dict named like a published checkpoint; every entry a distinct constant (no memory)."""
    shapes = listed_shapes()
    shapes["proposal_generator.rpn_head.objectness_logits.weight"] = (objectness, 512, 1, 1)
    shapes["proposal_generator.rpn_head.objectness_logits.bias"] = (objectness,)
    shapes["roi_heads.box_predictor.bbox_pred.weight"] = (box_classes * 4, 2048)
    shapes["roi_heads.box_predictor.bbox_pred.bias"] = (box_classes * 4,)
    for key, shape in ATTRIBUTE_SHAPES.items():
        part, param = key.split(".")
        shapes[f"roi_heads.box_predictor.{names[part]}.{param}"] = shape
    if batches_tracked:
        for key in [k for k in shapes if k.endswith(".norm.running_mean") and (".res4." in k or ".res5." in k)]:
            shapes[key.replace("running_mean", "num_batches_tracked")] = ()
    return {key: torch.tensor(float(i + 1)).expand(shape) for i, (key, shape) in enumerate(shapes.items())}


def assert_every_entry_landed(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    mapped = normalise_names(state)
    assert set(mapped) == set(loaded)
    for key, value in mapped.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


@pytest.mark.parametrize(
    "names, objectness, box_classes, batches_tracked, convention",
    [(PY_BUA_ATTRIBUTES, 12, 1600, False, D2), (MILVLG_ATTRIBUTES, 24, 1601, True, CAFFE)],
    ids=["py-bottom-up-attention", "bottom-up-attention.pytorch"],
)
def test_published_naming_loads_every_parameter(names, objectness, box_classes, batches_tracked, convention):
    state = published_state(names, objectness, box_classes, batches_tracked)
    normalised = normalise_names(state)
    model = detector_for_state(normalised, "published", 101)
    assert model.convention == convention
    report = load_state(model, normalised, "published", allow_missing_keys=False)
    assert report.missing == [] and report.unexpected == [] and report.bn_stats_defaulted == 0
    assert_every_entry_landed(model, state)


def random_detector(convention, seed: int) -> BUTDDetector:
    torch.manual_seed(seed)
    model = BUTDDetector(50, convention)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var", "norm.weight", "norm.bias")):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return model


@pytest.fixture(scope="module")
def saved_detectors(tmp_path_factory):
    """A d2-convention R-50 as a detectron2 .pkl and a caffe-convention one as a MILVLG-named .pth."""
    folder = tmp_path_factory.mktemp("butd")
    d2 = random_detector(D2, seed=1)
    with open(folder / "d2.pkl", "wb") as fh:
        pickle.dump({"model": {k: v.numpy() for k, v in d2.state_dict().items()}, "__author__": "test"}, fh)
    caffe = random_detector(CAFFE, seed=2)
    renamed = {}
    for key, value in caffe.state_dict().items():
        for ours, theirs in (("cls_embedding", "cls_embed"), ("fc_attr", "attr_linear1"), ("attr_score", "attr_linear2")):
            key = key.replace(f"box_predictor.{ours}.", f"box_predictor.{theirs}.")
        renamed[key] = value
    torch.save({"model": renamed}, folder / "caffe.pth")
    save_file({k: v.contiguous() for k, v in d2.state_dict().items()}, str(folder / "d2.safetensors"))
    return folder, d2, caffe


@pytest.mark.parametrize("name, index", [("d2.pkl", 1), ("caffe.pth", 2), ("d2.safetensors", 1)])
def test_saved_detector_round_trip(saved_detectors, name, index):
    folder, *models = saved_detectors
    original = models[index - 1]
    assert check_detector_weights(str(folder / name), 50, allow_missing_keys=False).missing == []
    loaded, report = build_detector(str(folder / name), 50, allow_missing_keys=False)
    assert report.convention == original.convention.name and loaded.convention == original.convention
    expected = original.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_missing_and_unexpected_keys_are_named(saved_detectors, tmp_path):
    folder, d2, _ = saved_detectors
    state = d2.state_dict()
    state.pop("roi_heads.box_predictor.fc_attr.weight")
    state["roi_heads.box_predictor.extra_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointMismatchError) as refused:
        check_detector_weights(str(tmp_path / "damaged.pth"), 50, allow_missing_keys=False)
    message = str(refused.value)
    assert "roi_heads.box_predictor.fc_attr.weight" in message and "roi_heads.box_predictor.extra_head.weight" in message
    assert "allow_missing_keys" in message
    _, report = build_detector(str(tmp_path / "damaged.pth"), 50, allow_missing_keys=True)
    assert report.missing == ["roi_heads.box_predictor.fc_attr.weight"]
    assert report.unexpected == ["roi_heads.box_predictor.extra_head.weight"]
    assert len(report.warnings) == 2


def test_shape_mismatch_and_wrong_depth_are_refused(saved_detectors, tmp_path):
    folder, d2, _ = saved_detectors
    with pytest.raises(ShnetError, match="regions.depth=50"):
        check_detector_weights(str(folder / "d2.pkl"), 101, allow_missing_keys=True)
    state = d2.state_dict()
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 2048)
    torch.save(state, tmp_path / "coco.pth")
    with pytest.raises(CheckpointMismatchError, match=r"cls_score.weight: model \(1601, 2048\) vs file \(81, 2048\)"):
        check_detector_weights(str(tmp_path / "coco.pth"), 50, allow_missing_keys=True)


def test_frozen_bn_without_running_statistics_gets_zero_and_one(saved_detectors, tmp_path):
    _, d2, _ = saved_detectors
    state = {k: v for k, v in d2.state_dict().items() if not k.startswith("backbone.stem.conv1.norm.running_")}
    torch.save(state, tmp_path / "no-stats.pth")
    loaded, report = build_detector(str(tmp_path / "no-stats.pth"), 50, allow_missing_keys=False)
    assert report.bn_stats_defaulted == 1 and report.missing == []
    assert torch.equal(loaded.backbone.stem.conv1.norm.running_mean, torch.zeros(64))
    assert torch.equal(loaded.backbone.stem.conv1.norm.running_var, torch.ones(64))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"model": {"x": payload}}, fh)
    with pytest.raises(ShnetError, match="refusing to unpickle"):
        check_detector_weights(str(tmp_path / "evil.pkl"), 50, allow_missing_keys=False)
    assert not marker.exists()


def test_anchors_are_detectron2_default_generator_anchors():
    cell = cell_anchors((64, 128))
    assert cell.shape == (6, 4)
    # size-major; ratio = height / width; area = size^2; centred on the origin
    expected = [[-s / math.sqrt(r) / 2, -s * math.sqrt(r) / 2, s / math.sqrt(r) / 2, s * math.sqrt(r) / 2] for s in (64, 128) for r in (0.5, 1, 2)]
    torch.testing.assert_close(cell, torch.tensor(expected), rtol=0, atol=1e-4)
    assert cell[1].tolist() == [-32.0, -32.0, 32.0, 32.0]
    assert CAFFE.anchor_sizes == (4, 8, 16, 32) and D2.anchor_sizes == (64, 128, 256, 512)
    grid = grid_anchors(cell, 2, 3, 16)
    assert grid.shape == (2 * 3 * 6, 4)
    # position (y=1, x=2), anchor 5: the cell anchor moved by (32, 16)
    assert torch.allclose(grid[(1 * 3 + 2) * 6 + 5], cell[5] + torch.tensor([32.0, 16.0, 32.0, 16.0]))


def test_box_decoding_and_clipping_both_conventions():
    box = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    deltas = torch.tensor([[0.1, 0.0, math.log(2.0), 0.0]])
    # Caffe: width 10, centre 5 -> centre 6, width 20
    assert box_coder.decode(deltas, box, (1, 1, 1, 1), plus_one=True).tolist() == [[-4.0, 0.0, 16.0, 10.0]]
    # detectron2: width 9, centre 4.5 -> centre 5.4, width 18
    assert torch.allclose(box_coder.decode(deltas, box, (1, 1, 1, 1), plus_one=False), torch.tensor([[-3.6, 0.0, 14.4, 9.0]]))
    # weights divide the deltas; dw is clamped at log(1000 / 16)
    weighted = box_coder.decode(torch.tensor([[1.0, 0.0, 50.0, 0.0]]), box, (10, 10, 5, 5), plus_one=False)
    assert torch.allclose(weighted, torch.tensor([[0.9 + 4.5 - 4.5 * 1000 / 16, 0.0, 0.9 + 4.5 + 4.5 * 1000 / 16, 9.0]]))
    wild = torch.tensor([[-5.0, 3.0, 120.0, 40.0]])
    assert box_coder.clip(wild, 30, 100, plus_one=True).tolist() == [[0.0, 3.0, 99.0, 29.0]]
    assert box_coder.clip(wild, 30, 100, plus_one=False).tolist() == [[0.0, 3.0, 100.0, 30.0]]


def caffe_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """MILVLG's ``nms_cpu`` (pixel-inclusive areas; float32 IoU >= float32 threshold suppresses),
    written out independently."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap < np.float32(threshold)]
    return keep


def test_per_class_nms_max_conf_matches_a_loop_over_classes():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 80, size=(40, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 40, size=(40, 2))], axis=1).astype(np.float32)
    scores = rng.dirichlet(np.ones(31), size=40).astype(np.float32)[:, 1:]
    expected = np.zeros(40, np.float32)
    for c in range(scores.shape[1]):
        keep = caffe_nms(boxes, scores[:, c], 0.3)
        expected[keep] = np.maximum(expected[keep], scores[keep, c])
    got = max_class_confidence(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3, plus_one=True)
    np.testing.assert_array_equal(got.numpy(), expected)


# IoU exactly 0.5 and 0.25 (pixel-inclusive: 10x10 inside 10x20 and 10x40; without +1: 10x10 inside
# 10x20 and 10x40 drawn one pixel larger); the third box overlaps neither
PLUS_ONE_BOXES = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 19.0], [0.0, 0.0, 9.0, 39.0], [50.0, 50.0, 60.0, 60.0]])
PLAIN_BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 40.0], [50.0, 50.0, 60.0, 60.0]])
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6])


@pytest.mark.parametrize("threshold", [0.5, 0.25])
def test_caffe_nms_suppresses_at_an_iou_equal_to_the_threshold(threshold):
    """MILVLG's CPU NMS suppresses at IoU >= threshold (RPN and selection); detectron2's (torchvision)
    only above it. Box 0 overlaps box 1 at 0.5 and box 2 at 0.25."""
    assert box_coder.iou(PLUS_ONE_BOXES[:1], PLUS_ONE_BOXES[1:3], plus_one=True).tolist() == [[0.5, 0.25]]
    assert box_coder.iou(PLAIN_BOXES[:1], PLAIN_BOXES[1:3], plus_one=False).tolist() == [[0.5, 0.25]]
    touching = 1 if threshold == 0.5 else 2
    caffe = box_coder.nms(PLUS_ONE_BOXES, SCORES, threshold, plus_one=True).tolist()
    assert touching not in caffe and caffe == caffe_nms(PLUS_ONE_BOXES.numpy(), SCORES.numpy(), threshold)
    assert touching in box_coder.nms(PLAIN_BOXES, SCORES, threshold, plus_one=False).tolist()
    groups = torch.zeros(4, dtype=torch.long)
    assert touching not in box_coder.batched_nms(PLUS_ONE_BOXES, SCORES, groups, threshold, plus_one=True).tolist()
    assert touching in box_coder.batched_nms(PLAIN_BOXES, SCORES, groups, threshold, plus_one=False).tolist()
    # the Caffe selection: box 0 (its class's best) suppresses the touching box in that class
    max_conf = max_class_confidence(PLUS_ONE_BOXES, SCORES[:, None], threshold, plus_one=True)
    assert max_conf[touching] == 0 and max_conf[0] == SCORES[0]
    assert max_class_confidence(PLAIN_BOXES, SCORES[:, None], threshold, plus_one=False)[touching] == SCORES[touching]
    # detectron2's per-class inference keeps it
    found = per_class_detections(PLAIN_BOXES[:, None], SCORES[:, None], 0.1, threshold, 10, plus_one=False)
    assert touching in found.proposal.tolist()


def test_nms_at_thresholds_no_float32_iou_equals():
    """0.3 and 0.7 are not float32 numbers: MILVLG compares with float32(threshold), torchvision
    with the double; for IoUs off the threshold both rules are the plain comparison."""
    assert box_coder.suppression_threshold(0.7, plus_one=False) == 0.7
    below = box_coder.suppression_threshold(0.3, plus_one=True)
    assert np.float32(below) == below and np.nextafter(np.float32(below), np.float32(1)) == np.float32(0.3)
    rng = np.random.default_rng(9)
    corners = rng.uniform(0, 80, size=(60, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 40, size=(60, 2))], axis=1).astype(np.float32)
    scores = rng.random(60).astype(np.float32)
    for threshold in (0.3, 0.7):
        assert box_coder.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold, plus_one=True).tolist() == caffe_nms(boxes, scores, threshold)


def test_adaptive_and_fixed_counts():
    conf = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.9, 0.25, 0.15])
    # between min and max: every box over the threshold, in proposal order
    assert caffe_keep(conf, 0.2, 2, 5).tolist() == [0, 2, 4, 5]
    # too few: the best min_boxes by confidence
    assert caffe_keep(conf, 0.2, 6, 10).tolist() == [4, 0, 2, 5, 6, 1]
    # too many: the best max_boxes
    assert caffe_keep(conf, 0.2, 1, 3).tolist() == [4, 0, 2]
    # fixed K = min = max
    assert caffe_keep(conf, 0.2, 4, 4).tolist() == [0, 2, 4, 5]
    assert caffe_keep(conf, 0.2, 3, 3).tolist() == [4, 0, 2]


def test_d2_selection_raises_the_nms_threshold_until_k_boxes():
    # two overlapping boxes (IoU 0.6) of one class plus one apart: 2 survive NMS 0.5, 3 survive 0.6+
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0], [50.0, 50.0, 60.0, 60.0]])
    class_boxes = boxes[:, None, :].repeat(1, 2, 1)
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.7, 0.1]])
    found = d2_detections(class_boxes, scores, 0.2, 3, 0.5, plus_one=False)
    assert found.proposal.tolist() == [0, 1, 2] and found.classes.tolist() == [0, 0, 0]
    fewer = d2_detections(class_boxes, scores, 0.2, 5, 0.5, plus_one=False)
    assert len(fewer.proposal) == 3  # never reaches 5: the last threshold's detections
    assert d2_detections(class_boxes, scores, 0.2, 2, 0.5, plus_one=False).proposal.tolist() == [0, 2]


def test_caffe_resize_follows_milvlg():
    assert caffe_scale(480, 640, 600, 1000) == 600 / 480
    assert caffe_scale(200, 1000, 600, 1000) == 1.0  # 600/200 would make the long side 3000
    image = preprocess(np.zeros((48, 64, 3), np.uint8), 24, 40, "caffe")
    assert image.image.shape == (3, 24, 32) and image.scale == (0.5, 0.5)
    assert np.allclose(image.image[:, 0, 0], [-102.9801, -115.9465, -122.7717])  # BGR minus caffe means
    rgb = (np.random.default_rng(4).random((333, 517, 3)) * 255).astype(np.uint8)
    scale = 600 / 333
    expected = cv2.resize(rgb[:, :, ::-1].astype(np.float32) - np.float32([102.9801, 115.9465, 122.7717]), None, None, fx=scale, fy=scale)
    prepared = preprocess(rgb, 600, 1000, "caffe")
    np.testing.assert_array_equal(prepared.image, expected.transpose(2, 0, 1))
    assert prepared.scale == (scale, scale)


def test_d2_size_is_detectron2s_resize_shortest_edge():
    assert d2_size(333, 517, 600, 1000) == (600, 932)  # 517 * 600 / 333 = 931.53
    assert d2_size(517, 333, 600, 1000) == (932, 600)
    assert d2_size(200, 1000, 600, 1000) == (200, 1000)  # the long side capped: scaled again
    assert d2_size(901, 1333, 600, 1000) == (600, 888)  # 1333 * 600 / 901 = 887.68
    # 1667 * 600 / 1000 = 1000.2 passes 1000 before rounding: capped, 599.88 -> 600 (MILVLG rounds first: no cap)
    assert d2_size(1000, 1667, 600, 1000) == (600, 1000)
    assert caffe_scale(1000, 1667, 600, 1000) == 0.6


@pytest.mark.parametrize("height, width", [(333, 517), (901, 1333)], ids=["enlarged", "shrunk"])
def test_d2_input_is_the_pil_resized_uint8_image_minus_the_means(height, width):
    """py-bottom-up-attention: the BGR uint8 image through PIL bilinear at detectron2's size, then
    float minus the means: bit for bit (antialiased when shrinking; cv2 on floats would differ)."""
    rgb = (np.random.default_rng(height).random((height, width, 3)) * 255).astype(np.uint8)
    new_h, new_w = {333: (600, 932), 901: (600, 888)}[height]
    bgr = Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1])).resize((new_w, new_h), Image.BILINEAR)
    expected = (np.asarray(bgr).astype(np.float32) - np.float32([102.9801, 115.9465, 122.7717])).transpose(2, 0, 1)
    prepared = preprocess(rgb, 600, 1000, "d2")
    np.testing.assert_array_equal(prepared.image, expected)
    assert prepared.resized_hw == (new_h, new_w) and prepared.original_hw == (height, width)
    assert prepared.scale == (new_w / width, new_h / height)  # per axis, as detector_postprocess maps back


def test_boxes_map_as_each_extractor_maps_them():
    """MILVLG divides by its one scale (``boxes / im_scale``); py-bottom-up-attention multiplies by
    original / resized per axis and clips (``detector_postprocess``); given boxes are multiplied by
    the scale in both (``bbox * im_scale``; the given-box demo's ``scale_x``, ``scale_y``)."""
    rgb = np.zeros((333, 517, 3), np.uint8)
    boxes = torch.tensor([[10.3, 20.7, 500.9, 300.2], [0.0, 0.0, 932.0, 600.0]])
    caffe, d2 = preprocess(rgb, 600, 1000, "caffe"), preprocess(rgb, 600, 1000, "d2")
    assert torch.equal(caffe.to_original(boxes), boxes / (600 / 333))
    assert torch.equal(caffe.to_resized(boxes), boxes * (600 / 333))
    per_axis = torch.tensor([517 / 932, 333 / 600, 517 / 932, 333 / 600])
    expected = boxes * per_axis
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 517)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 333)
    assert torch.equal(d2.to_original(boxes), expected)
    assert d2.to_original(boxes)[1].tolist() == [0.0, 0.0, 517.0, 333.0]
    assert torch.equal(d2.to_resized(boxes), boxes * torch.tensor([932 / 517, 600 / 333, 932 / 517, 600 / 333]))


@pytest.fixture(scope="module")
def tiny_detector():
    model, _ = build_detector("random", 50, allow_missing_keys=False)
    return model


@pytest.fixture(scope="module")
def detectors_with_bn_statistics():
    """Both conventions' R-50 with non-trivial frozen BN: zero padding would no longer stay zero."""
    return {"caffe": random_detector(CAFFE, seed=7).eval(), "d2": random_detector(D2, seed=8).eval()}


@pytest.mark.parametrize("convention, selection", [("caffe", "caffe"), ("d2", "d2"), ("d2", "caffe")])
def test_regions_do_not_depend_on_batch_mates(detectors_with_bn_statistics, convention, selection, single_torch_thread):
    """Each image alone and in a batch of four sizes (two images share one): bit for bit the same
    boxes, scores, classes and features, in input order. Exact equality, not a tolerance: the detector
    runs each image alone, so nothing it computes for an image depends on the others (a shared padded
    or same-size batch changes the bits, padding far more near the right and bottom edges)."""
    model = detectors_with_bn_statistics[convention]
    rng = np.random.default_rng(5)
    shapes = [(60, 90), (80, 80), (61, 90), (45, 100), (80, 80)]
    images = [preprocess((rng.random((*shape, 3)) * 255).astype(np.uint8), 64, 96, convention) for shape in shapes]
    assert len({image.resized_hw for image in images}) == 4
    # 4 proposals to choose 3 boxes from: the res5 head over each proposal is most of the cost
    options = SelectionOptions(selection, 3, 3, 0.0 if selection == "d2" else 0.2, 0.3 if selection == "caffe" else 0.5, 6000, 4, 0.7)
    batched = extract_regions(model, images, options, contextlib.nullcontext())
    for image, together in zip(images, batched):
        alone = extract_regions(model, [image], options, contextlib.nullcontext())[0]
        for name in ("boxes", "features", "object_class", "object_score", "attr_class", "attr_score"):
            np.testing.assert_array_equal(getattr(together, name), getattr(alone, name), err_msg=name)
        height, width = image.original_hw
        assert len(alone.boxes) == 3 and (alone.boxes[:, 2] <= width).all() and (alone.boxes[:, 3] <= height).all()


def test_given_boxes_are_pooled_as_given(tiny_detector, single_torch_thread):
    import contextlib

    image = preprocess((np.random.default_rng(2).random((50, 70, 3)) * 255).astype(np.uint8), 48, 80, "caffe")
    image.given_boxes = np.asarray([[5, 5, 30, 40], [0, 0, 69, 49], [20, 10, 21, 11]], np.float32)
    options = SelectionOptions("caffe", 36, 36, 0.2, 0.3, 6000, 300, 0.7)
    regions = extract_regions(tiny_detector, [image], options, contextlib.nullcontext())[0]
    np.testing.assert_array_equal(regions.boxes, image.given_boxes)
    assert regions.features.shape == (3, 2048) and np.isfinite(regions.features).all()
    assert regions.object_class.shape == (3,) and (regions.object_class < 1600).all() and (regions.attr_class < 400).all()


def test_d2_selection_gives_regressed_boxes_in_original_pixels(tiny_detector, single_torch_thread):
    import contextlib

    image = preprocess((np.random.default_rng(3).random((60, 80, 3)) * 255).astype(np.uint8), 48, 64, "caffe")
    options = SelectionOptions("d2", 3, 3, 0.0, 0.5, 6000, 4, 0.7)
    regions = extract_regions(tiny_detector, [image], options, contextlib.nullcontext())[0]
    assert regions.boxes.shape == (3, 4) and regions.features.shape == (3, 2048)
    assert (regions.boxes >= 0).all() and (regions.boxes[:, [0, 2]] <= 80).all() and (regions.boxes[:, [1, 3]] <= 60).all()
    assert (np.diff(regions.object_score) <= 0).all()  # detections best first
