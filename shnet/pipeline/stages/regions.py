"""Stage ``regions``: bottom-up-attention Faster R-CNN region features (the 36 x 2048 features of the
retrieval literature), per image padded to K boxes with ``num_boxes`` valid.

K is ``num_boxes`` (fixed, 36 by default), ``max_boxes`` when adaptive (``num_boxes: null`` with
``min_boxes``/``max_boxes``), or, with ``boxes=FILE``, the most boxes the file gives one image.
Object classes index the 1600 Visual Genome objects, attribute classes the 400 attributes
(background / "no attribute" excluded), in the order of the models' vocabulary files.
"""

from __future__ import annotations

import warnings

import numpy as np

from ...fileio import content_sha256
from ...weights import weights_identity
from ...errors import ShnetError
from ...cache import schema
from .base import ImageStage, StageOutput
from ...devices import autocast, place_model

BACKENDS = ("native", "detectron2")
SELECTIONS = ("caffe", "d2")
DEPTHS = (50, 101)
FIRST_NMS_IOU = {"caffe": 0.3, "d2": 0.5}
#: part of the config (the cache's identity): a cache made with earlier numerics is refused, not mixed
NUMERICS = "2: each checkpoint's own resize, images never padded, caffe-convention NMS at IoU >= threshold"


class RegionsStage(ImageStage):
    name = schema.REGIONS
    defaults = {
        "backend": "native",
        "weights": None,
        "depth": 101,
        "selection": "caffe",
        "num_boxes": 36,
        "min_boxes": None,
        "max_boxes": None,
        "conf_threshold": 0.2,
        "nms_iou": None,
        "min_size": 600,
        "max_size": 1000,
        "pre_nms_topk": 6000,
        "post_nms_topk": 300,
        "rpn_nms_iou": 0.7,
        "boxes": None,
        "allow_missing_keys": False,
    }
    location_keys = ("weights", "boxes")
    description = "bottom-up-attention Faster R-CNN region features [K, 2048], boxes, classes, attributes"

    def resolve_config(self, options):
        config = super().resolve_config(options)
        _require(config["backend"] in BACKENDS, f"regions.backend must be one of {', '.join(BACKENDS)} (got {config['backend']!r})")
        _require(config["selection"] in SELECTIONS, f"regions.selection must be one of {', '.join(SELECTIONS)} (got {config['selection']!r})")
        _require(config["depth"] in DEPTHS, f"regions.depth must be 101 (the published models) or 50 (got {config['depth']!r})")
        if config["weights"] is None:
            raise ShnetError(
                "regions needs weights: --set regions.weights=/path/to/faster_rcnn_from_caffe_attr.pkl or "
                "bua-caffe-frcn-r101_with_attributes.pth (see the README), or regions.weights=random for a smoke run"
            )
        for key in ("min_size", "max_size", "pre_nms_topk", "post_nms_topk"):
            config[key] = _positive_int(config, key)
        if config["nms_iou"] is None:
            config["nms_iou"] = FIRST_NMS_IOU[config["selection"]]
        for key in ("conf_threshold", "nms_iou", "rpn_nms_iou"):
            config[key] = _number(config, key)
        _require(0 < config["nms_iou"] < 1 and 0 < config["rpn_nms_iou"] <= 1, "regions.nms_iou and regions.rpn_nms_iou must be in (0, 1)")
        config["min_boxes"], config["max_boxes"] = _box_counts(config)
        _require(isinstance(config["allow_missing_keys"], bool), f"regions.allow_missing_keys must be true or false (got {config['allow_missing_keys']!r})")
        config["weights_sha256"] = weights_identity(config["weights"])
        config["boxes_sha256"] = content_sha256(config["boxes"]) if config["boxes"] else ""
        config["slots"] = self._given_slots(config) if config["boxes"] else config["max_boxes"]
        config["numerics"] = NUMERICS
        return config

    @staticmethod
    def _given_slots(config) -> int:
        from ..given_boxes import read_given_boxes

        counts = [len(b) for b in read_given_boxes(config["boxes"]).values()]
        _require(counts and max(counts) > 0, f"regions.boxes file {config['boxes']} gives no boxes")
        return max(counts)

    def check(self, config):
        from ..models.butd.weights import check_detector_weights

        if config["backend"] == "detectron2":
            _import_detectron2()
        report = check_detector_weights(config["weights"], config["depth"], config["allow_missing_keys"])
        if config["backend"] == "detectron2" and report is not None and report.convention != "d2":
            raise ShnetError(
                f"regions.backend=detectron2 runs py-bottom-up-attention's network; {config['weights']} is a "
                "bottom-up-attention.pytorch (caffe convention) checkpoint: use regions.backend=native"
            )
        for line in report.warnings if report else ():
            warnings.warn(f"regions: {line}", stacklevel=2)

    def load(self, config, device):
        from ..models.butd.weights import build_detector
        from ..models.butd.conventions import CONVENTIONS
        from ..models.butd.extract import SelectionOptions

        if config["backend"] == "detectron2":
            model, report = _detectron2_detector(config, device), None
        else:
            model, report = build_detector(config["weights"], config["depth"], config["allow_missing_keys"], CONVENTIONS[config["selection"]])
            model = place_model(model, device)
        given = None
        if config["boxes"]:
            from ..given_boxes import read_given_boxes

            given = read_given_boxes(config["boxes"])
        options = SelectionOptions(
            config["selection"], config["min_boxes"], config["max_boxes"], config["conf_threshold"], config["nms_iou"],
            config["pre_nms_topk"], config["post_nms_topk"], config["rpn_nms_iou"],
        )
        return RegionsModel(model, report, options, given)

    def outputs(self, config, model):
        return schema.specs(schema.REGIONS, K=config["slots"], D=schema.REGION_FEATURE_DIM)

    def attrs(self, config, model):
        from ...data import visual_genome_vocabulary

        report = model.report
        random_init = config["weights"] == "random"
        objects, attributes = visual_genome_vocabulary()
        return {
            "model": f"bottom-up-attention Faster R-CNN R-{config['depth']} ({config['backend']}, "
            + ("random-init)" if random_init else f"{model.detector.convention.name} convention)"),
            "backend": config["backend"],
            "weights_sha256": config["weights_sha256"],
            "convention": model.detector.convention.name,
            "selection": config["selection"],
            "num_boxes": config["slots"],
            "min_boxes": config["min_boxes"],
            "max_boxes": config["max_boxes"],
            "conf_threshold": config["conf_threshold"],
            "nms_iou": config["nms_iou"],
            "boxes_sha256": config["boxes_sha256"],
            "missing_keys": list(report.missing) if report else [],
            "unexpected_keys": list(report.unexpected) if report else [],
            "bn_stats_defaulted": report.bn_stats_defaulted if report else 0,
            "object_names": list(objects),
            "attribute_names": list(attributes),
            "warnings": (["random-init weights: the features carry no meaning"] if random_init else [])
            + (report.warnings if report else []),
        }

    def run(self, job, writer, model):
        if model.given is not None:
            ids = dict(zip(job.images["row"].tolist(), job.images["image_id"].tolist()))
            model = model.for_rows(ids)
        return super().run(job, writer, model)

    def _decode_batch(self, chunk, config, model):
        """Decode as every image stage does, then attach each image's given boxes (an image the
        boxes file does not list is recorded as failed)."""
        rows, prepared, failures, seconds = super()._decode_batch(chunk, config, model)
        if model.given is None:
            return rows, prepared, failures, seconds
        from ..given_boxes import clip_to_image

        kept_rows, kept = [], []
        for row, item in zip(rows, prepared):
            image_id = model.row_ids.get(row)
            boxes = model.given.get(image_id)
            if boxes is None or not len(boxes):
                failures.append((row, f"regions.boxes file {config['boxes']} gives no boxes for image {image_id!r}"))
                continue
            height, width = item.original_hw
            item.given_boxes, item.clipped_boxes, outside = clip_to_image(boxes, height, width)
            if outside:
                failures.append(
                    (row, f"regions.boxes file {config['boxes']}: {outside} of the {len(boxes)} boxes of image {image_id!r} lie wholly "
                     f"outside its {width}x{height} pixels; fix or drop them")
                )
                continue
            kept_rows.append(row)
            kept.append(item)
        return kept_rows, kept, failures, seconds

    def prepare(self, rgb, config, model):
        from ..models.butd.preprocess import preprocess

        return preprocess(rgb, config["min_size"], config["max_size"], model.detector.convention.name)

    def infer(self, model, prepared, config, device):
        from ..models.butd.extract import extract_regions

        regions = extract_regions(model.detector, prepared, model.options, autocast(device, "float16"))
        k, n = config["slots"], len(prepared)
        arrays = {name: np.full((n,) + spec.shape, spec.fill, spec.dtype) for name, spec in self.outputs(config, model).items()}
        arrays[schema.IMAGE_HW][:] = [p.original_hw for p in prepared]
        for i, r in enumerate(regions):
            count = min(len(r.boxes), k)
            arrays[schema.NUM_BOXES][i] = count
            arrays[schema.FEATURES][i, :count] = r.features[:count]
            arrays[schema.BOXES][i, :count] = r.boxes[:count]
            for name in (schema.OBJECT_CLASS, schema.OBJECT_SCORE, schema.ATTR_CLASS, schema.ATTR_SCORE):
                arrays[name][i, :count] = getattr(r, name)[:count]
        scalars = {schema.NUM_BOXES: arrays[schema.NUM_BOXES].copy()}
        if config["boxes"]:
            scalars["clipped_boxes"] = np.asarray([p.clipped_boxes for p in prepared], np.int32)
        return StageOutput(arrays=arrays, scalars=scalars)


class RegionsModel:
    """What a worker holds for the stage: the detector, its load report, selection, given boxes."""

    def __init__(self, detector, report, options, given, row_ids=None):
        self.detector = detector
        self.report = report
        self.options = options
        self.given = given
        self.row_ids = row_ids or {}

    def for_rows(self, row_ids: dict) -> "RegionsModel":
        return RegionsModel(self.detector, self.report, self.options, self.given, row_ids)


def _require(condition, message: str) -> None:
    if not condition:
        raise ShnetError(message)


def _positive_int(config, key) -> int:
    try:
        value = int(config[key])
    except (TypeError, ValueError):
        value = 0
    _require(value >= 1, f"regions.{key} must be a positive integer (got {config[key]!r})")
    return value


def _number(config, key) -> float:
    try:
        return float(config[key])
    except (TypeError, ValueError):
        raise ShnetError(f"regions.{key} must be a number (got {config[key]!r})") from None


def _box_counts(config) -> tuple[int, int]:
    """(min_boxes, max_boxes): fixed K is K, K; adaptive needs num_boxes null and both bounds."""
    if config["num_boxes"] is not None:
        _require(
            config["min_boxes"] is None and config["max_boxes"] is None,
            "regions: give either num_boxes (a fixed K) or min_boxes and max_boxes with num_boxes: null (adaptive), not both",
        )
        k = _positive_int(config, "num_boxes")
        return k, k
    _require(
        config["min_boxes"] is not None and config["max_boxes"] is not None,
        "regions: adaptive box counts need both regions.min_boxes and regions.max_boxes (e.g. 10 and 100)",
    )
    low, high = _positive_int(config, "min_boxes"), _positive_int(config, "max_boxes")
    _require(low <= high, f"regions.min_boxes ({low}) must not exceed regions.max_boxes ({high})")
    return low, high


def _detectron2_detector(config, device):
    from ..models.butd.detectron2_backend import Detectron2Detector

    _import_detectron2()
    return Detectron2Detector(
        config["weights"], config["depth"], config["pre_nms_topk"], config["post_nms_topk"], config["rpn_nms_iou"],
        device, config["allow_missing_keys"],
    )


def _import_detectron2():
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise ShnetError(
            "regions.backend=detectron2 needs detectron2 importable in this environment (it is on no package "
            "registry: build it from source), or use regions.backend=native"
        ) from exc
