"""Data files shipped inside the shnet package."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


def sample_images_dir() -> Path:
    """The folder of bundled sample photos that ``shnet extract --sample`` runs on."""
    return Path(resources.files(__name__).joinpath("samples"))


@dataclass(frozen=True)
class Category:
    """One COCO panoptic category: its contiguous class index (0..132), dataset id, name, thing/stuff."""

    index: int
    id: int
    name: str
    is_thing: bool


@functools.cache
def coco_panoptic_categories() -> tuple[Category, ...]:
    """The 133 COCO panoptic categories (80 things, 53 stuff) in the order whose position is the class
    index of every stored map and of the 3SHNet inputs (``seg_feat``, ``seg_map``, ``cat_onehot``)."""
    raw = json.loads(resources.files(__name__).joinpath("coco_panoptic_categories.json").read_text())
    return tuple(Category(index=i, id=int(c["id"]), name=str(c["name"]), is_thing=bool(c["isthing"])) for i, c in enumerate(raw))


@functools.cache
def visual_genome_vocabulary() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The bottom-up-attention model's 1600 object and 400 attribute names (Visual Genome
    1600-400-20), in the order of stage ``regions``' ``object_class`` / ``attr_class`` indices."""
    raw = json.loads(resources.files(__name__).joinpath("visual_genome_vocabulary.json").read_text())
    return tuple(raw["objects"]), tuple(raw["attributes"])
