"""The demo's data set on disk, laid out as the real ones are.

```
DATA/images/00000.jpg ...            the scenes (JPEG, varied sizes and aspect ratios)
DATA/panoptic.json                   COCO panoptic annotations (images, annotations[].segments_info, categories)
DATA/panoptic/00000.png ...          COCO panoptic PNGs (segment id = R + 256 G + 256^2 B)
DATA/captions.json                   Karpathy split file (images[].filename, split, sentences[].raw/tokens)
DATA/boxes.json                      ground-truth object boxes {image_id: [[x1, y1, x2, y2], ...]} (regions.boxes)
DATA/dataset.json                    the generator settings, written last: the set is complete
```

The panoptic files follow COCO's ``panoptic_val2017.json`` + ``panoptic_val2017/`` layout, so the
``panoptic`` stage's ``coco`` backend reads them with its defaults.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import ShnetError
from ..fileio import atomic_write_json
from .scenes import encode_segment_ids, make_scene

IMAGES, PANOPTIC_JSON, PANOPTIC_DIR = "images", "panoptic.json", "panoptic"
CAPTIONS, BOXES, RECORD = "captions.json", "boxes.json", "dataset.json"
DATASET_NAME = "shnet-demo"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSettings:
    """What determines the generated set: the same settings always give the same files."""

    images: int
    seed: int = 0
    max_side: int = 160
    val_images: int = 0  # 0: a tenth of the set
    test_images: int = 0  # 0: a tenth of the set

    def split_sizes(self) -> dict[str, int]:
        val = self.val_images or max(1, self.images // 10)
        test = self.test_images or max(1, self.images // 10)
        train = self.images - val - test
        if train < 2:
            raise ShnetError(f"{self.images} images leave {train} for training after {val} val and {test} test; use more images")
        return {"train": train, "val": val, "test": test}

    def split_of(self, index: int) -> str:
        sizes = self.split_sizes()
        if index < sizes["train"]:
            return "train"
        return "val" if index < sizes["train"] + sizes["val"] else "test"


@dataclass(frozen=True)
class DatasetFiles:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / IMAGES

    @property
    def panoptic_json(self) -> Path:
        return self.root / PANOPTIC_JSON

    @property
    def panoptic_dir(self) -> Path:
        return self.root / PANOPTIC_DIR

    @property
    def captions(self) -> Path:
        return self.root / CAPTIONS

    @property
    def boxes(self) -> Path:
        return self.root / BOXES

    @property
    def record(self) -> Path:
        return self.root / RECORD


def image_name(index: int) -> str:
    return f"{index:05d}"


def tokens(sentence: str) -> list[str]:
    return re.findall(r"[a-z]+", sentence.lower())


def _categories_json() -> list[dict]:
    raw = json.loads(resources.files("shnet.data").joinpath("coco_panoptic_categories.json").read_text())
    return [{"id": c["id"], "name": c["name"], "isthing": c["isthing"], "supercategory": c.get("supercategory", "")} for c in raw]


def existing_dataset(root: str | Path, settings: DatasetSettings) -> DatasetFiles | None:
    """The complete set at ``root`` when it was generated with ``settings``; refuses other settings."""
    files = DatasetFiles(Path(root))
    if not files.record.exists():
        return None
    recorded = json.loads(files.record.read_text())
    if recorded != asdict(settings):
        raise ShnetError(
            f"{files.root} holds a demo set generated with {recorded}, not {asdict(settings)}; "
            "use another output directory (or the same --images/--seed as before to resume)"
        )
    return files


def generate_dataset(root: str | Path, settings: DatasetSettings, progress: Callable[[int, int], None] | None = None) -> DatasetFiles:
    """Write the whole set under ``root`` (or return it untouched when it is already there)."""
    done = existing_dataset(root, settings)
    if done is not None:
        return done
    files = DatasetFiles(Path(root))
    settings.split_sizes()
    for folder in (files.images, files.panoptic_dir):
        folder.mkdir(parents=True, exist_ok=True)
    categories = _categories_json()
    panoptic_images, annotations, karpathy, boxes = [], [], [], {}
    sentence_id = 0
    for index in range(settings.images):
        scene = make_scene(settings.seed, index, settings.max_side)
        name = image_name(index)
        height, width = scene.pixels.shape[:2]
        Image.fromarray(scene.pixels).save(files.images / f"{name}.jpg", quality=92)
        Image.fromarray(encode_segment_ids(scene.segment_map)).save(files.panoptic_dir / f"{name}.png")
        panoptic_images.append({"id": index, "file_name": f"{name}.jpg", "width": width, "height": height})
        annotations.append(
            {
                "image_id": index,
                "file_name": f"{name}.png",
                "segments_info": [
                    {"id": s.id, "category_id": s.category.id, "area": s.area, "bbox": list(s.bbox), "iscrowd": 0} for s in scene.segments
                ],
            }
        )
        boxes[name] = [[x, y, x + w, y + h] for s in scene.segments if s.category.is_thing for x, y, w, h in [s.bbox]]
        sentences = []
        for caption in scene.captions:
            sentences.append({"raw": caption, "tokens": tokens(caption), "imgid": index, "sentid": sentence_id})
            sentence_id += 1
        karpathy.append(
            {
                "filename": f"{name}.jpg",
                "imgid": index,
                "split": settings.split_of(index),
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        if progress is not None:
            progress(index + 1, settings.images)
    atomic_write_json(files.panoptic_json, {"images": panoptic_images, "annotations": annotations, "categories": categories})
    atomic_write_json(files.captions, {"dataset": DATASET_NAME, "images": karpathy})
    atomic_write_json(files.boxes, boxes)
    atomic_write_json(files.record, asdict(settings))
    return files

