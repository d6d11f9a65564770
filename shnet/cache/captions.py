"""Captions, torch-free, on the cache floor: caption files read, splits selected, caption images
matched to cache ids, and the captions a cache carries.

Sources:
- Karpathy JSON (``dataset_coco.json``, ``dataset_flickr30k.json``): ``images`` with ``filename``,
  optional ``filepath``, ``split`` and ``sentences`` (``raw`` text). An image is named
  ``filepath/filename``. Only the first 5 sentences of an image are kept, as in the standard
  precomputed caption files (a few COCO images have 6 or 7).
- CSV / TSV / Parquet with columns ``image_id``, ``caption``, ``split``.
- The captions a cache carries: ``CACHE/captions.parquet`` (image_id, caption, split), written by
  ``shnet import`` in the order of the imported caption files, so that ``shnet train --cache CACHE``
  and ``shnet evaluate`` need no separate caption file. It has the columns of the CSV/Parquet
  format, so :func:`read_captions` reads it like any caption file.

The split ``train`` also takes Karpathy's ``restval`` images (COCO's extra training images).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import ShnetError
from ..fileio import atomic_write_parquet, read_parquet, reading, refuse_control_characters
from .store import Cache

KARPATHY_CAPTIONS_PER_IMAGE = 5
SPLIT_ALIASES = {"train": ("train", "restval"), "val": ("val", "dev")}  # dev: SCAN's name of the validation split
_REPORT_EXAMPLES = 5
CAPTIONS_TABLE = "captions.parquet"
CAPTION_COLUMNS = ["image_id", "caption", "split"]


@dataclass
class CaptionTable:
    """Every caption of a source: columns ``image`` (the source's image name), ``caption``, ``split``."""

    frame: pd.DataFrame
    source: str
    dataset: str | None = None  # "coco" / "flickr30k" when a Karpathy file says so

    @property
    def splits(self) -> list[str]:
        return sorted(self.frame["split"].astype(str).unique())


@dataclass
class CaptionSet:
    """The captions of one split grouped by image: image ``i`` owns ``captions[starts[i]:starts[i+1]]``."""

    images: list[str]
    captions: list[str]
    caption_image: np.ndarray  # [n_captions] index into ``images``
    split: str
    source: str
    dataset: str | None = None

    @property
    def num_images(self) -> int:
        return len(self.images)

    def captions_per_image(self) -> np.ndarray:
        return np.bincount(self.caption_image, minlength=len(self.images))

    def subset(self, keep: Sequence[int], rename: Sequence[str] | None = None) -> "CaptionSet":
        """The images at positions ``keep`` (in that order) with their captions, optionally renamed."""
        keep = np.asarray(keep, dtype=np.int64)
        position = np.full(len(self.images), -1, dtype=np.int64)
        position[keep] = np.arange(len(keep))
        new_owner = position[self.caption_image]
        order = np.flatnonzero(new_owner >= 0)
        order = order[np.argsort(new_owner[order], kind="stable")]
        names = list(rename) if rename is not None else [self.images[i] for i in keep]
        return CaptionSet(
            images=names,
            captions=[self.captions[i] for i in order],
            caption_image=new_owner[order],
            split=self.split,
            source=self.source,
            dataset=self.dataset,
        )

    def first_images(self, count: int) -> "CaptionSet":
        return self if count <= 0 or count >= self.num_images else self.subset(range(count))

    def require_captions_per_image(self, expected: int) -> None:
        """Evaluation protocols need exactly ``expected`` captions per image; refuse anything else."""
        counts = self.captions_per_image()
        wrong = np.flatnonzero(counts != expected)
        if len(wrong):
            examples = ", ".join(f"{self.images[i]} ({counts[i]})" for i in wrong[:_REPORT_EXAMPLES])
            raise ShnetError(
                f"split '{self.split}' of {self.source}: the evaluation protocols need exactly {expected} captions "
                f"per image, but {len(wrong)} of {self.num_images} images have another number, e.g. {examples}"
            )


def read_captions(path: str | Path) -> CaptionTable:
    """Read a Karpathy JSON or a CSV/Parquet caption file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ShnetError(f"caption file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv", ".tsv", ".parquet", ".pq"):
        raise ShnetError(f"{path}: captions must be a Karpathy .json or a .csv/.tsv/.parquet table (image_id, caption, split)")
    with reading(path, "caption file", _CAPTION_FIX):
        table = _read_karpathy(path) if suffix == ".json" else _table_from_frame(_read_caption_frame(path, suffix), path)
    for name in (*table.frame["image"].unique(), *table.frame["split"].unique()):
        refuse_control_characters(name, f"caption file {path}")
    return table


_CAPTION_FIX = "a caption file is a UTF-8 Karpathy .json or a .csv/.tsv/.parquet table with columns image_id, caption, split"


def _read_caption_frame(path: Path, suffix: str) -> pd.DataFrame:
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False, encoding="utf-8")
    return pd.read_parquet(path)


def _read_karpathy(path: Path) -> CaptionTable:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ShnetError(f"{path}: not a Karpathy split file (expected an object with an 'images' list)")
    images, captions, splits = [], [], []
    for position, entry in enumerate(data["images"]):
        try:
            name = entry["filename"]
            split = entry["split"]
            sentences = entry["sentences"]
        except (KeyError, TypeError) as exc:
            raise ShnetError(f"{path}: image #{position} lacks {exc} (Karpathy entries have filename, split, sentences)") from None
        if not isinstance(sentences, list) or not all(isinstance(x, dict) for x in sentences) or not isinstance(name, str):
            raise ShnetError(f"{path}: image #{position} has a filename that is not a string or sentences that are not a list of objects; {_CAPTION_FIX}")
        if entry.get("filepath"):
            name = f"{entry['filepath']}/{name}"
        for sentence in sentences[:KARPATHY_CAPTIONS_PER_IMAGE]:
            images.append(name)
            captions.append(sentence["raw"].strip() if "raw" in sentence else " ".join(sentence["tokens"]))
            splits.append(split)
    frame = pd.DataFrame({"image": images, "caption": captions, "split": splits})
    return CaptionTable(frame=frame, source=str(path), dataset=data.get("dataset"))


def _table_from_frame(frame: pd.DataFrame, path: Path) -> CaptionTable:
    missing = [c for c in ("image_id", "caption", "split") if c not in frame.columns]
    if missing:
        raise ShnetError(f"{path}: missing column(s) {', '.join(missing)}; a caption table has image_id, caption, split")
    frame = pd.DataFrame(
        {
            "image": frame["image_id"].astype(str).to_numpy(),
            "caption": frame["caption"].astype(str).str.strip().to_numpy(),
            "split": frame["split"].astype(str).to_numpy(),
        }
    )
    empty = frame["caption"] == ""
    if empty.any():
        raise ShnetError(f"{path}: {int(empty.sum())} empty caption(s), e.g. for image {frame.loc[empty, 'image'].iloc[0]}")
    return CaptionTable(frame=frame, source=str(path))


def select_split(table: CaptionTable, split: str) -> CaptionSet:
    """The captions of ``split`` grouped by image, images in order of first appearance."""
    names = SPLIT_ALIASES.get(split, (split,))
    rows = table.frame[table.frame["split"].isin(names)]
    if rows.empty:
        raise ShnetError(f"{table.source} has no captions in split '{split}' (its splits: {', '.join(table.splits) or 'none'})")
    codes, images = pd.factorize(rows["image"], sort=False)
    order = np.argsort(codes, kind="stable")
    return CaptionSet(
        images=[str(i) for i in images],
        captions=rows["caption"].to_numpy()[order].tolist(),
        caption_image=codes[order].astype(np.int64),
        split=split,
        source=table.source,
        dataset=table.dataset,
    )


def _without_extension(name: str) -> str:
    path = PurePosixPath(name)
    return str(path.with_suffix("")) if path.suffix else name


@dataclass
class ImageMatch:
    """Caption images matched to cache ids, and those that could not be used."""

    cache_ids: dict[str, str] = field(default_factory=dict)  # caption image name -> cache image_id
    not_in_cache: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)  # cache image_id -> why (failed / incomplete stage)

    @property
    def num_missing(self) -> int:
        return len(self.not_in_cache) + len(self.ambiguous) + len(self.unusable)

    def report(self, split: str, total: int) -> str:
        """A short explanation of the images that cannot be used, with what to do about them."""
        parts = [f"{self.num_missing} of {total} images of split '{split}' have no usable features in the cache(s):"]
        if self.not_in_cache:
            parts.append(f"  {len(self.not_in_cache)} not in any cache, e.g. {', '.join(self.not_in_cache[:_REPORT_EXAMPLES])}")
        if self.ambiguous:
            examples = "; ".join(f"{k} -> {' | '.join(v[:3])}" for k, v in list(self.ambiguous.items())[:_REPORT_EXAMPLES])
            parts.append(f"  {len(self.ambiguous)} whose file name matches several cache images, e.g. {examples}")
        if self.unusable:
            examples = "; ".join(f"{k} ({v})" for k, v in list(self.unusable.items())[:_REPORT_EXAMPLES])
            parts.append(f"  {len(self.unusable)} whose features failed or are not extracted yet, e.g. {examples}")
        parts.append(
            "  Caption images are matched to cache image_ids exactly, then without the file extension, then by a "
            "unique file name. Extract the missing images (`shnet extract`, which resumes), pass the cache that "
            "holds them with another --cache, or check that --captions belongs to these caches."
        )
        return "\n".join(parts)


def match_images(names: Iterable[str], cache_ids: Iterable[str]) -> ImageMatch:
    """Map caption image names to cache ids: exact id, else the name without extension, else a
    unique file-name (basename) match."""
    known = set(cache_ids)
    by_basename: dict[str, list[str]] = defaultdict(list)
    for image_id in known:
        by_basename[PurePosixPath(image_id).name].append(image_id)
    match = ImageMatch()
    for name in names:
        if name in known:
            match.cache_ids[name] = name
            continue
        stem_path = _without_extension(name)
        if stem_path in known:
            match.cache_ids[name] = stem_path
            continue
        candidates = by_basename.get(PurePosixPath(stem_path).name, [])
        if len(candidates) == 1:
            match.cache_ids[name] = candidates[0]
        elif candidates:
            match.ambiguous[name] = sorted(candidates)
        else:
            match.not_in_cache.append(name)
    return match


def write_cache_captions(cache: Cache, frame: pd.DataFrame) -> None:
    """Store ``frame`` (image_id, caption, split; rows in caption order) as the cache's captions."""
    missing = [c for c in CAPTION_COLUMNS if c not in frame]
    if missing:
        raise ShnetError(f"internal: a caption table needs columns {CAPTION_COLUMNS}, lacks {missing}")
    unknown = set(frame["image_id"]) - set(cache.images()["image_id"])
    if unknown:
        raise ShnetError(f"captions name {len(unknown)} image(s) that {cache.root} does not hold, e.g. {sorted(unknown)[:3]}")
    atomic_write_parquet(cache.root / CAPTIONS_TABLE, frame[CAPTION_COLUMNS].reset_index(drop=True))
    counts = frame.groupby("split", sort=True).size()
    cache.record["captions"] = {"table": CAPTIONS_TABLE, "captions": {str(k): int(v) for k, v in counts.items()}}
    cache.save_record()


def cache_captions_path(cache: Cache) -> Path | None:
    """The cache's caption table, or None when it holds no captions."""
    if "captions" not in cache.record:
        return None
    path = cache.root / cache.record["captions"]["table"]
    if not path.is_file():
        raise ShnetError(f"{cache.root}/cache.json records captions in {path.name}, which is missing; re-import the cache")
    return path


def read_cache_captions(cache: Cache) -> pd.DataFrame | None:
    path = cache_captions_path(cache)
    return None if path is None else read_parquet(path, "the cache's captions", "re-import the cache (`shnet import`)")


def stored_captions(cache_roots: Sequence[str | Path]) -> str | None:
    """The caption table that the given caches hold (None when none holds one); several caches
    holding captions is ambiguous and refused."""
    found = [path for path in (cache_captions_path(Cache(root)) for root in cache_roots) if path is not None]
    if len(found) > 1:
        raise ShnetError(f"several caches hold captions ({', '.join(str(p.parent) for p in found)}); choose them with --captions FILE")
    return str(found[0]) if found else None


def captions_source(given: str | None, cache_roots: Sequence[str | Path]) -> str:
    """The caption file to use: ``given``, else the captions that one of the caches holds."""
    if given:
        return str(given)
    stored = stored_captions(cache_roots)
    if stored is None:
        raise ShnetError("no --captions FILE given and no given cache holds captions (only `shnet import` stores them); pass --captions FILE")
    return stored
