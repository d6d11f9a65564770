"""A seeded generator of captioned synthetic scenes with COCO-panoptic ground truth.

Each scene is a textured background (one or two COCO panoptic STUFF categories: sky over grass,
a brick wall, ...) with two or three flat shapes on it, each shape a COCO panoptic THING category
(a circle is a ``sports ball``, an octagon a ``stop sign``, ...). Shapes are drawn in order, so a
later one hides part of an earlier one; the panoptic map holds what is visible, and a scene is
redrawn until every shape keeps most of its area and no two shapes sit at nearly the same place
(so "left of" / "above" in a caption is never a coin toss). Five captions per scene state what is
visible: colour, size, noun, relative and absolute position, occlusion, and the ground.

Scene ``i`` of seed ``s`` depends on ``(s, i)`` only, so a longer set starts with the shorter one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..data import Category, coco_panoptic_categories

CAPTIONS_PER_SCENE = 5
VOID_ID = 0  # segment id of unlabelled pixels in a COCO panoptic PNG (none here: backgrounds cover all)


@dataclass(frozen=True)
class ShapeKind:
    """A drawable shape, the COCO THING category it stands for, and the noun captions use."""

    noun: str
    category: str
    outline: str  # how :func:`shape_mask` draws it


SHAPES = (
    ShapeKind("ball", "sports ball", "circle"),
    ShapeKind("frisbee", "frisbee", "wide-ellipse"),
    ShapeKind("kite", "kite", "diamond"),
    ShapeKind("stop sign", "stop sign", "octagon"),
    ShapeKind("book", "book", "tall-rectangle"),
    ShapeKind("pizza", "pizza", "triangle"),
    ShapeKind("umbrella", "umbrella", "half-disc"),
)

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 35),
    "purple": (135, 55, 185),
    "orange": (250, 135, 25),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}


@dataclass(frozen=True)
class Ground:
    """A STUFF category covering the background (or its lower part under the sky)."""

    category: str
    phrase: str  # how captions place the scene: "on the grass"
    base: tuple[int, int, int]
    texture: str
    hides: tuple[str, ...]  # object colours too close to this ground to be seen


GROUNDS = (
    Ground("grass-merged", "on the grass", (70, 140, 50), "blades", ("green",)),
    Ground("sand", "on the sand", (212, 186, 132), "grain", ("yellow", "orange")),
    Ground("snow", "in the snow", (236, 239, 246), "grain", ("white",)),
    Ground("sea", "over the sea", (30, 92, 150), "waves", ("blue",)),
    Ground("wall-brick", "in front of a brick wall", (158, 68, 48), "bricks", ("red", "orange")),
    Ground("floor-wood", "on a wooden floor", (150, 100, 56), "planks", ("orange",)),
)
SKY = Ground("sky-other-merged", "under the sky", (110, 160, 230), "gradient", ("blue", "white"))
HORIZON_GROUNDS = ("grass-merged", "sand", "snow", "sea")

SMALL, LARGE = "small", "large"
SIZE_RANGES = {SMALL: (0.10, 0.14), LARGE: (0.20, 0.26)}  # radius as a share of the shorter image side
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9)  # width / height
MIN_VISIBLE = 0.6  # a shape keeps at least this share of its area
MIN_SEPARATION = 0.22  # centres at least this share of the shorter side apart


@dataclass
class SceneObject:
    kind: ShapeKind
    colour: str
    size: str
    centre: tuple[float, float]  # x, y in pixels
    radius: float
    mask: np.ndarray  # [H, W] bool, the full shape before anything covers it

    def describe(self, with_size: bool = True) -> str:
        words = f"{self.size} {self.colour} {self.kind.noun}" if with_size else f"{self.colour} {self.kind.noun}"
        return f"{article(words)} {words}"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind.noun}"


@dataclass
class Segment:
    """One panoptic segment: its id in the PNG, its category, and what it covers."""

    id: int
    category: Category
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h


@dataclass
class Scene:
    """One generated image with its panoptic map and captions."""

    pixels: np.ndarray  # [H, W, 3] uint8
    segment_map: np.ndarray  # [H, W] int32 segment ids
    segments: list[Segment]
    captions: list[str]
    objects: list[SceneObject] = field(repr=False)
    grounds: list[Ground] = field(repr=False)


def article(words: str) -> str:
    return "an" if words[:1] in "aeiou" else "a"


def category_by_name() -> dict[str, Category]:
    return {c.name: c for c in coco_panoptic_categories()}


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def image_size(rng: np.random.Generator, max_side: int) -> tuple[int, int]:
    """(height, width): a random aspect ratio, the longer side between 80% and 100% of ``max_side``."""
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    longer = int(rng.integers(int(max_side * 0.8), max_side + 1))
    if aspect >= 1:
        return max(32, round(longer / aspect)), longer
    return longer, max(32, round(longer * aspect))


def shape_mask(outline: str, centre: tuple[float, float], radius: float, hw: tuple[int, int]) -> np.ndarray:
    """The shape's pixels as a boolean [H, W] mask (drawn without antialiasing, so exact)."""
    height, width = hw
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    r = radius
    if outline == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif outline == "wide-ellipse":
        draw.ellipse([cx - r, cy - 0.5 * r, cx + r, cy + 0.5 * r], fill=1)
    elif outline == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)], fill=1)
    elif outline == "octagon":
        draw.regular_polygon((cx, cy, r), 8, rotation=22.5, fill=1)
    elif outline == "tall-rectangle":
        draw.rectangle([cx - 0.7 * r, cy - r, cx + 0.7 * r, cy + r], fill=1)
    elif outline == "triangle":
        draw.polygon([(cx - r, cy - 0.8 * r), (cx + r, cy - 0.8 * r), (cx, cy + r)], fill=1)
    elif outline == "half-disc":
        draw.pieslice([cx - r, cy - 0.6 * r, cx + r, cy + 1.4 * r], 180, 360, fill=1)
    else:
        raise ValueError(f"unknown outline {outline!r}")
    return np.asarray(canvas, dtype=bool)


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] at the image size (a coarse random grid, bilinearly enlarged)."""
    height, width = hw
    coarse = rng.uniform(-1, 1, size=(max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR), dtype=np.float32)


def texture(ground: Ground, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float [H, W, 3] texture of ``ground`` over the whole image (the caller keeps its part)."""
    height, width = hw
    base = np.asarray(ground.base, np.float32)
    shade = 18 * _smooth_noise(rng, hw, 24)
    grain = rng.normal(0, 7, size=(height, width)).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if ground.texture == "blades":
        grain += 22 * np.sin(xs * 1.7 + 3 * _smooth_noise(rng, hw, 6)) * (rng.random((height, width)) < 0.5)
    elif ground.texture == "waves":
        grain += 18 * np.sin(ys * 0.9 + 2.5 * np.sin(xs * 0.15 + rng.uniform(0, 6)))
    elif ground.texture == "bricks":
        rows = (ys // 8).astype(int)
        offset = np.where(rows % 2 == 1, 8, 0)
        mortar = (ys % 8 < 1.5) | ((xs + offset) % 16 < 1.5)
        grain += np.where(mortar, 70, 0)
    elif ground.texture == "planks":
        grain += 14 * np.sin(xs * 0.8 + 4 * _smooth_noise(rng, hw, 12)) - np.where(xs % 20 < 1.5, 45, 0)
    elif ground.texture == "gradient":
        grain = grain * 0.5 + 60 * (ys / max(1, height - 1))
    return base + (shade + grain)[..., None]


def _choose_objects(rng: np.random.Generator, allowed_colours: list[str], count: int) -> list[tuple[ShapeKind, str, str]]:
    """Distinct (shape, colour) pairs with their sizes; colours and shapes differ within a scene."""
    kinds = rng.choice(len(SHAPES), size=count, replace=False)
    colours = rng.choice(len(allowed_colours), size=count, replace=False)
    sizes = [SMALL if rng.random() < 0.5 else LARGE for _ in range(count)]
    return [(SHAPES[k], allowed_colours[c], s) for k, c, s in zip(kinds, colours, sizes)]


def _place(rng, chosen, hw) -> list[SceneObject] | None:
    """Random centres for the chosen shapes, or None when the draw breaks a placement rule."""
    height, width = hw
    short = min(hw)
    objects = []
    for kind, colour, size in chosen:
        low, high = SIZE_RANGES[size]
        radius = float(rng.uniform(low, high) * short)
        centre = (float(rng.uniform(radius, width - radius)), float(rng.uniform(radius, height - radius)))
        if any(math.dist(centre, o.centre) < MIN_SEPARATION * short for o in objects):
            return None
        objects.append(SceneObject(kind, colour, size, centre, radius, shape_mask(kind.outline, centre, radius, hw)))
    for i, obj in enumerate(objects):
        covered = np.zeros(hw, dtype=bool)
        for later in objects[i + 1 :]:
            covered |= later.mask
        full = int(obj.mask.sum())
        if full == 0 or (obj.mask & ~covered).sum() < MIN_VISIBLE * full:
            return None
    return objects


def make_scene(seed: int, index: int, max_side: int = 160) -> Scene:
    """Scene ``index`` of the set with ``seed`` (its pixels, panoptic segments and 5 captions)."""
    rng = scene_rng(seed, index)
    hw = image_size(rng, max_side)
    height, width = hw
    with_sky = rng.random() < 0.5
    candidates = [g for g in GROUNDS if not with_sky or g.category in HORIZON_GROUNDS]
    ground = candidates[rng.integers(len(candidates))]
    grounds = [SKY, ground] if with_sky else [ground]
    hidden = {c for g in grounds for c in g.hides}
    allowed = [c for c in COLOURS if c not in hidden]

    count = 3 if rng.random() < 0.5 else 2
    objects = None
    while objects is None:
        chosen = _choose_objects(rng, allowed, count)
        for _ in range(40):
            objects = _place(rng, chosen, hw)
            if objects is not None:
                break
        count = max(2, count - 1) if objects is None else count

    categories = category_by_name()
    segment_map = np.zeros(hw, dtype=np.int32)
    pixels = np.zeros((height, width, 3), dtype=np.float32)
    segment_ids = {}
    horizon = int(rng.uniform(0.35, 0.6) * height) if with_sky else 0
    for stuff_index, g in enumerate(grounds):
        region = np.zeros(hw, dtype=bool)
        if g is SKY:
            region[:horizon] = True
        else:
            region[horizon:] = True
        seg_id = categories[g.category].id * 1000
        segment_ids[seg_id] = categories[g.category]
        segment_map[region] = seg_id
        pixels[region] = texture(g, hw, rng)[region]
    for number, obj in enumerate(objects, start=1):
        seg_id = categories[obj.kind.category].id * 1000 + number
        segment_ids[seg_id] = categories[obj.kind.category]
        segment_map[obj.mask] = seg_id
        colour = np.asarray(COLOURS[obj.colour], np.float32)
        shading = rng.normal(0, 6, size=(int(obj.mask.sum()), 1)).astype(np.float32)
        pixels[obj.mask] = colour + shading
    pixels = np.clip(pixels, 0, 255).round().astype(np.uint8)
    segments = segments_of(segment_map, segment_ids)
    captions = describe(objects, grounds, hw, rng)
    return Scene(pixels, segment_map, segments, captions, objects, grounds)


def segments_of(segment_map: np.ndarray, categories: dict[int, Category]) -> list[Segment]:
    """Area and bounding box of every segment id present in the map (in id order)."""
    segments = []
    for seg_id in sorted(int(i) for i in np.unique(segment_map) if i != VOID_ID):
        ys, xs = np.nonzero(segment_map == seg_id)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        segments.append(Segment(seg_id, categories[seg_id], int(len(xs)), bbox))
    return segments


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which they are further apart."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def place_name(obj: SceneObject, hw: tuple[int, int]) -> str:
    """The image third the shape's centre lies in: "at the top left", "in the middle", ..."""
    height, width = hw
    column = ("left", "", "right")[min(2, int(3 * obj.centre[0] / width))]
    row = ("top", "", "bottom")[min(2, int(3 * obj.centre[1] / height))]
    if not row and not column:
        return "in the middle"
    return "at the " + " ".join(w for w in (row, column) if w)


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(objects: list[SceneObject], grounds: list[Ground], hw: tuple[int, int], rng: np.random.Generator) -> list[str]:
    """Five captions, one per template: left-to-right listing, relations, count, sizes, placement."""
    ground = grounds[-1]
    sky = " under the sky" if len(grounds) == 2 else ""
    count_word = {2: "two", 3: "three"}[len(objects)]
    shuffled = [objects[i] for i in rng.permutation(len(objects))]
    by_x = sorted(objects, key=lambda o: o.centre[0])
    by_size = sorted(objects, key=lambda o: -o.radius)

    listing = f"from left to right {join_words([o.describe() for o in by_x])} {ground.phrase}"
    first, second = shuffled[0], shuffled[1]
    relations = f"{first.describe()} {relation(first, second)} {second.describe()}"
    if len(shuffled) == 3:
        third = shuffled[2]
        relations += f" and {third.describe()} {relation(third, second)} the {second.name}"
    relations += f" {ground.phrase}{sky}"
    counting = f"{count_word} objects {ground.phrase}: " + join_words([o.describe(with_size=False) for o in shuffled])
    biggest, rest = by_size[0], by_size[1:]
    sizes = f"the biggest object is the {biggest.name}, with " + join_words([o.describe() for o in rest]) + f" {ground.phrase}"
    front = _in_front_pair(objects)
    if front is not None:
        over, under = front
        placement = f"{over.describe(with_size=False)} partly covering {under.describe(with_size=False)}"
        others = [o for o in shuffled if o is not over and o is not under]
        placement += "".join(f" and {o.describe(with_size=False)} {place_name(o, hw)}" for o in others)
    else:
        placement = join_words([f"{o.describe(with_size=False)} {place_name(o, hw)}" for o in shuffled])
    placement += f"{sky}" if sky else f" {ground.phrase}"
    return [listing, relations, counting, sizes, placement]


def _in_front_pair(objects: list[SceneObject]) -> tuple[SceneObject, SceneObject] | None:
    """The first (drawn later, drawn earlier) pair whose shapes overlap, if any."""
    for i, under in enumerate(objects):
        for over in objects[i + 1 :]:
            if (under.mask & over.mask).any():
                return over, under
    return None


def encode_segment_ids(segment_map: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG pixels: id = R + 256 * G + 256^2 * B."""
    ids = segment_map.astype(np.uint32)
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def decode_segment_ids(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
