"""Backend ``coco`` of stage ``panoptic``: COCO-panoptic-format annotations read as the stage's output.

The standard format: a JSON with ``annotations[]`` (``file_name`` of a PNG, ``image_id``,
``segments_info[]`` with ``id`` and ``category_id``), optionally ``images[]`` and ``categories[]``,
and a folder of PNGs whose pixels encode the segment id as ``R + 256 G + 256^2 B`` (0 = void).
Images are matched by file name stem: an image ``.../000000000139.jpg`` takes the annotation whose
PNG (or whose ``images[]`` entry) is named ``000000000139``.

Category ids are the JSON's own: with a ``categories[]`` list their names are matched to the COCO
panoptic classes like a model's labels (``panoptic.label_map`` maps the rest); without one they are
taken as COCO panoptic dataset ids (1..200).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...data import coco_panoptic_categories
from ...errors import ShnetError
from ...cache.schema import NUM_CLASSES, SEG_CELLS
from ..segmaps import PanopticResult, segments_from_id_map
from .panoptic_labels import match_labels, read_label_map


@dataclass
class CocoPanopticAnnotations:
    """An annotation file indexed by image stem, with its category ids resolved to class indices."""

    json_path: Path
    png_dir: Path
    by_stem: dict[str, dict]
    category_index: dict[int, int]

    def result(self, image_path: str) -> PanopticResult:
        """The stored-stage result of one image; ShnetError when it has no annotation or PNG."""
        stem = Path(image_path).stem
        annotation = self.by_stem.get(stem)
        if annotation is None:
            raise ShnetError(f"no annotation for image '{stem}' in {self.json_path} (images are matched by file name stem)")
        png = self.png_dir / annotation["file_name"]
        try:
            with Image.open(png) as image:
                rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
        except (OSError, ValueError) as exc:
            raise ShnetError(f"cannot read the panoptic PNG {png} of image '{stem}': {exc}") from exc
        segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        classes = {int(s["id"]): self.category_index[int(s["category_id"])] for s in annotation["segments_info"]}
        class_map, segments = segments_from_id_map(segment_ids, classes)
        for segment in segments:
            segment["score"] = float("nan")
        return PanopticResult(class_map=class_map, segments=segments, probs=np.zeros((NUM_CLASSES, SEG_CELLS, SEG_CELLS), np.float32))


def default_annotation_dir(json_path: str) -> Path:
    """COCO's layout: ``panoptic_val2017.json`` beside the folder ``panoptic_val2017/``."""
    path = Path(json_path).expanduser()
    return path.with_suffix("") if path.suffix == ".json" else path.parent


def read_annotations(json_path: str | None, annotation_dir: str | None, label_map_path: str | None) -> CocoPanopticAnnotations:
    """Read and check the annotation file once; refuses a missing or malformed one, naming it."""
    if json_path is None:
        raise ShnetError("panoptic.backend=coco needs the COCO panoptic JSON: --set panoptic.annotations=/path/panoptic_val2017.json")
    path = Path(json_path).expanduser()
    if not path.is_file():
        raise ShnetError(f"panoptic.annotations: no file {path}")
    png_dir = Path(annotation_dir).expanduser() if annotation_dir else default_annotation_dir(json_path)
    if not png_dir.is_dir():
        raise ShnetError(f"panoptic annotation PNG folder {png_dir} not found; give it with --set panoptic.annotation_dir=/path/to/pngs")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShnetError(f"panoptic.annotations {path} is not valid JSON: {exc}") from exc
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise ShnetError(f"panoptic.annotations {path} is not a COCO panoptic file: it needs an 'annotations' list")
    for i, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "file_name" not in annotation or not isinstance(annotation.get("segments_info"), list):
            raise ShnetError(f"panoptic.annotations {path}: annotations[{i}] needs 'file_name' and a 'segments_info' list")
        for segment in annotation["segments_info"]:
            if not isinstance(segment, dict) or "id" not in segment or "category_id" not in segment:
                raise ShnetError(f"panoptic.annotations {path}: annotations[{i}] ({annotation['file_name']}) has a segment without 'id'/'category_id'")
    category_index = _category_index(data, path, label_map_path)
    used = {int(s["category_id"]) for a in annotations for s in a["segments_info"]}
    unknown = sorted(used - set(category_index))
    if unknown:
        raise ShnetError(
            f"panoptic.annotations {path}: segments use category ids {unknown[:20]} that its categories list does not define; "
            "fix the file (every segments_info[].category_id must be one of categories[].id)"
        )
    return CocoPanopticAnnotations(path, png_dir, _index_by_stem(data, annotations), category_index)


def _category_index(data: dict, path: Path, label_map_path: str | None) -> dict[int, int]:
    categories = data.get("categories")
    if categories is None:
        return {c.id: c.index for c in coco_panoptic_categories()}
    if not isinstance(categories, list) or not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories):
        raise ShnetError(f"panoptic.annotations {path}: 'categories' must be a list of {{id, name, ...}}")
    id2label = {int(c["id"]): str(c["name"]) for c in categories}
    lut = match_labels(id2label, read_label_map(label_map_path), f"panoptic.annotations {path}", label_map_path)
    return {cid: int(lut[cid]) for cid in id2label}


def _index_by_stem(data: dict, annotations: list) -> dict[str, dict]:
    image_names = {}
    for image in data.get("images") or []:
        if isinstance(image, dict) and "id" in image and "file_name" in image:
            image_names[image["id"]] = Path(image["file_name"]).stem
    by_stem: dict[str, dict] = {}
    for annotation in annotations:
        by_stem[Path(annotation["file_name"]).stem] = annotation
        name = image_names.get(annotation.get("image_id"))
        if name is not None:
            by_stem.setdefault(name, annotation)
    return by_stem

