"""``shnet export``: splits of a cache written as a SCAN/3SHNet precomputed set
(:mod:`shnet.npy_sets.format`).

An imported split is written back as it was imported (its recorded headers and line endings: the
same bytes); any other split is chosen and ordered by a caption file (:func:`captions_split`). The
cache is read through :class:`shnet.cache.rows.ShardRows` in blocks of at most ``CHUNK_BYTES``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..cache.captions import CAPTIONS_TABLE, match_images, read_cache_captions, read_captions, select_split
from ..cache.rows import ShardRows
from ..cache.schema import FEATURES, NUM_BOXES, REGIONS
from ..cache.store import Cache
from ..errors import ShnetError
from ..fileio import atomic_path, plain_name, read_parquet
from .format import (
    ARRAY_KINDS,
    DEFAULT_CAPTIONS_PER_IMAGE,
    DEFAULT_FEATURES_DIR,
    EXAMPLES,
    IMPORT_RECORD,
    REGION_KIND,
    SPLITS_TABLE,
    ArrayKind,
    NpyHeader,
    TextLines,
    array_file,
    check_features_dir,
    check_region_ids,
    refuse_bad_ids,
    region_file,
    rows_per_chunk,
    text_file,
    write_region_file,
)


@dataclass
class ExportRequest:
    """One split to write: its images in order and, optionally, their captions (``captions_per_image``
    consecutive captions per image, in image order)."""

    split: str
    image_ids: list[str]
    captions: list[str] | None
    captions_per_image: int = DEFAULT_CAPTIONS_PER_IMAGE
    write_ids: bool = True
    verbatim: bool = False  # captions are lines read from a caps file: written back unchanged
    id_lines: list[str] | None = None  # the ids file's lines as imported (an id's surrounding spaces kept)
    per_image: bool = False  # region features as features_dir/ID.npy per image (the COCO loader), not {split}_ims.npy
    features_dir: str = DEFAULT_FEATURES_DIR
    region_headers: list[NpyHeader] | None = None  # per image: the header of its imported per-image file

    def with_region_layout(self, region_features: str | None, features_dir: str | None) -> "ExportRequest":
        """This request with the layout the user chose (None: as imported, else whole-split)."""
        per_image = self.per_image if region_features is None else region_features == "per-image"
        if features_dir and not per_image:
            raise ShnetError("--features-dir names the folder of per-image region files; add --region-features per-image")
        headers = self.region_headers if per_image else None
        return dataclasses.replace(self, per_image=per_image, features_dir=features_dir or self.features_dir, region_headers=headers)


def imported_split(cache: Cache, split: str) -> ExportRequest:
    """The request that writes ``split`` of an imported cache back as it was imported."""
    record = cache.record.get(IMPORT_RECORD)
    if record is None:
        raise ShnetError(f"{cache.root} was not made by `shnet import`; give --captions FILE to choose and order the split's images")
    if split not in record["splits"]:
        raise ShnetError(f"{cache.root} holds no imported split '{split}' (it has: {', '.join(sorted(record['splits']))})")
    order = read_parquet(cache.root / SPLITS_TABLE, "the imported split order", "re-import the cache (`shnet import`)")
    order = order[order["split"] == split].sort_values("position")
    image_ids = order["image_id"].astype(str).tolist()
    captions = None
    if record["splits"][split]["caps"] is not None:
        table = read_cache_captions(cache)
        rows = table[table["split"] == split]
        captions = rows["caption"].astype(str).tolist()
        if rows["image_id"].astype(str).tolist() != list(np.repeat(image_ids, record["captions_per_image"])):
            raise ShnetError(f"{cache.root}/{CAPTIONS_TABLE} no longer matches split '{split}' of the import; re-import the set")
    request = ExportRequest(
        split,
        image_ids,
        captions,
        record["captions_per_image"],
        write_ids=record["splits"][split]["ids"] is not None,
        verbatim=True,
        id_lines=order["id_line"].astype(str).tolist(),
    )
    region_files = record["splits"][split].get("region_files")
    if region_files is None:
        return request
    headers = [NpyHeader.from_record(entry) for entry in region_files["headers"]]
    per_image = [headers[i] for i in order["region_header"]]
    return dataclasses.replace(request, per_image=True, features_dir=region_files["folder"], region_headers=per_image)


def captions_split(cache: Cache, captions_path: str, split: str, captions_per_image: int) -> ExportRequest:
    """``split`` of a caption file as an export request: its images (matched to the cache's ids) in
    the file's order, each with exactly ``captions_per_image`` captions."""
    captions = select_split(read_captions(captions_path), split)
    match = match_images(captions.images, cache.images()["image_id"].astype(str))
    if match.not_in_cache or match.ambiguous:
        problems = [f"{len(match.not_in_cache)} not in the cache, e.g. {', '.join(match.not_in_cache[:EXAMPLES])}"] if match.not_in_cache else []
        if match.ambiguous:
            examples = "; ".join(f"{k} -> {' | '.join(v[:3])}" for k, v in list(match.ambiguous.items())[:EXAMPLES])
            problems.append(f"{len(match.ambiguous)} matching several cache images by file name, e.g. {examples}")
        raise ShnetError(
            f"{len(match.not_in_cache) + len(match.ambiguous)} of {captions.num_images} images of split '{split}' in {captions_path} "
            f"cannot be exported from {cache.root}: " + "; ".join(problems) + ". Extract them first (`shnet extract` resumes)."
        )
    counts = captions.captions_per_image()
    wrong = [i for i, count in enumerate(counts) if count != captions_per_image]
    if wrong:
        examples = ", ".join(f"{captions.images[i]} ({counts[i]})" for i in wrong[:EXAMPLES])
        raise ShnetError(
            f"split '{split}' of {captions_path}: the precomputed layout needs {captions_per_image} captions per image, "
            f"{len(wrong)} of {captions.num_images} images have another number, e.g. {examples}; pass --captions-per-image N"
        )
    image_ids = [match.cache_ids[name] for name in captions.images]
    return ExportRequest(split, image_ids, list(captions.captions), captions_per_image)


@dataclass
class _Source:
    """Where the split's images lie in one stage: shard and row per image, in export order."""

    stage: str
    shards: np.ndarray
    rows: np.ndarray
    item_shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]


def export_split(cache: Cache, request: ExportRequest, out_dir: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Write ``request``'s split of ``cache`` as a precomputed set into ``out_dir``; returns the files."""
    out = Path(out_dir).expanduser()
    plain_name(request.split, "--split")
    refuse_bad_ids(request.image_ids, f"the image ids of split '{request.split}'")
    if not request.image_ids:
        raise ShnetError(f"split '{request.split}' has no image to export")
    sources = _export_sources(cache, request)
    if not sources:
        raise ShnetError(
            f"{cache.root} has neither stage 'regions' nor 'layout' (with their arrays); run `shnet extract ... --stages layout` "
            "(and regions) first"
        )
    kinds = [kind for kind in ARRAY_KINDS if kind.stage in sources and kind.array in sources[kind.stage].item_shapes]
    if request.per_image:
        _check_per_image(cache, request, sources, out)
        kinds = [kind for kind in kinds if kind is not REGION_KIND]
    write_ids = request.write_ids or request.per_image  # the loader finds per-image files by the ids
    targets = [array_file(out, request.split, k.name) for k in kinds]
    if write_ids:
        targets.append(text_file(out, request.split, "ids"))
    if request.captions is not None:
        _check_captions(request)
        targets.append(text_file(out, request.split, "caps"))
    region_targets = [region_file(out / request.features_dir, i) for i in request.image_ids] if request.per_image else []
    existing = [str(p.relative_to(out)) for p in targets + region_targets if p.exists()]
    if existing:
        more = f" and {len(existing) - EXAMPLES} more" if len(existing) > EXAMPLES else ""
        raise ShnetError(f"{out} already holds {', '.join(existing[:EXAMPLES])}{more}; remove them or export into another -o folder")
    out.mkdir(parents=True, exist_ok=True)
    if REGIONS in sources and not request.region_headers:
        _note_padding(cache, request, log)
    recorded = cache.record.get(IMPORT_RECORD, {}).get("splits", {}).get(request.split, {})
    with ShardRows(cache) as files:
        for kind in kinds:
            header = _export_header(kind, sources[kind.stage], len(request.image_ids), recorded.get("arrays", {}).get(kind.name))
            _write_array(files, sources[kind.stage], kind, header, array_file(out, request.split, kind.name))
        if request.per_image:
            _write_region_files(files, sources[REGIONS], request, region_targets)
            targets.append(out / request.features_dir)
    styles = recorded if recorded else {"ids": {}, "caps": {}}
    if write_ids:
        TextLines(list(request.id_lines or request.image_ids), **(styles.get("ids") or {})).write(text_file(out, request.split, "ids"))
    if request.captions is not None:
        lines = request.captions if request.verbatim else [" ".join(c.splitlines()) for c in request.captions]
        TextLines(lines, **(styles.get("caps") or {})).write(text_file(out, request.split, "caps"))
    return targets


def _check_per_image(cache: Cache, request: ExportRequest, sources: dict[str, "_Source"], out: Path) -> None:
    """Refuse a per-image export that would have no features or write outside the features folder."""
    if REGIONS not in sources:
        raise ShnetError(f"{cache.root} has no stage 'regions'; per-image region features need it (`shnet extract ... --stages regions`)")
    check_features_dir(request.features_dir)
    if (out / request.features_dir).exists() and not (out / request.features_dir).is_dir():
        raise ShnetError(f"{out / request.features_dir} is a file; the per-image region files need that name as a folder (--features-dir NAME)")
    check_region_ids(request.image_ids, f"split '{request.split}' of {cache.root}", request.features_dir)


def _write_region_files(files: ShardRows, source: "_Source", request: ExportRequest, paths: list[Path]) -> None:
    """One file per image, read from the cache in blocks of at most :data:`CHUNK_BYTES`: an imported
    file's header and rows when recorded, else every stored row in ``{split}_ims.npy``'s dtype."""
    item_shape = source.item_shapes[FEATURES]
    dtype = _export_dtype(REGION_KIND, source.dtypes[FEATURES])
    step = rows_per_chunk(int(np.prod(item_shape)) * max(dtype.itemsize, source.dtypes[FEATURES].itemsize))
    for start in range(0, len(paths), step):
        stop = min(start + step, len(paths))
        block = files.read(REGIONS, FEATURES, source.shards[start:stop], source.rows[start:stop])
        for position, values in zip(range(start, stop), block):
            header = request.region_headers[position] if request.region_headers else None
            if header is not None and _describes(header, item_shape):
                write_region_file(paths[position], values, header)
            else:
                write_region_file(paths[position], values.astype(dtype), None)


def _describes(header: NpyHeader, item_shape: tuple[int, ...]) -> bool:
    """Whether an imported file's header fits the stored rows (K of them, the same feature size)."""
    return header.shape[0] <= item_shape[0] and header.shape[1:] == item_shape[1:]


def _check_captions(request: ExportRequest) -> None:
    expected = request.captions_per_image * len(request.image_ids)
    if len(request.captions) != expected:
        raise ShnetError(
            f"split '{request.split}': {len(request.captions)} captions for {len(request.image_ids)} images; "
            f"the precomputed layout needs exactly {request.captions_per_image} per image ({expected})"
        )


def _export_sources(cache: Cache, request: ExportRequest) -> dict[str, _Source]:
    images = cache.images().set_index("image_id")
    missing = [i for i in request.image_ids if i not in images.index]
    if missing:
        raise ShnetError(
            f"{len(missing)} of {len(request.image_ids)} images of split '{request.split}' are not in {cache.root}, "
            f"e.g. {', '.join(missing[:EXAMPLES])}"
        )
    located = images.loc[request.image_ids]
    shards, rows = located["shard"].to_numpy(np.int64), located["row"].to_numpy(np.int64)
    sources = {}
    for stage in dict.fromkeys(kind.stage for kind in ARRAY_KINDS):
        done = set(cache.done_shards(stage))
        if not done:
            continue
        names = [k.array for k in ARRAY_KINDS if k.stage == stage]
        absent = sorted(set(shards.tolist()) - done)
        if absent:
            raise ShnetError(
                f"stage '{stage}' of {cache.root} is not extracted for shard(s) {absent[:EXAMPLES]} holding images of split "
                f"'{request.split}'; finish it with `shnet extract` (which resumes)"
            )
        table = cache.stage_table(stage).set_index("image_id")
        status = table.loc[request.image_ids, "status"]
        failed = status[status != "ok"]
        if len(failed):
            errors = table.loc[failed.index, "error"]
            examples = "; ".join(f"{i} ({e or s})" for i, s, e in list(zip(failed.index, failed, errors))[:EXAMPLES])
            raise ShnetError(f"{len(failed)} images of split '{request.split}' have no usable '{stage}' arrays in {cache.root}, e.g. {examples}")
        with cache.open_arrays(stage, min(done)) as h5:
            shapes = {n: tuple(h5[n].shape[1:]) for n in names if n in h5}
            dtypes = {n: h5[n].dtype for n in names if n in h5}
        if shapes:
            sources[stage] = _Source(stage, shards, rows, shapes, dtypes)
    return sources


def _note_padding(cache: Cache, request: ExportRequest, log: Callable[[str], None]) -> None:
    table = cache.stage_table(REGIONS).set_index("image_id")
    if NUM_BOXES not in table:
        return
    counts = table.loc[request.image_ids, NUM_BOXES].to_numpy()
    with cache.open_arrays(REGIONS, cache.done_shards(REGIONS)[0]) as h5:
        width = int(h5[FEATURES].shape[1])
    short = int((counts < width).sum())
    written = f"{request.features_dir}/ID.npy files" if request.per_image else f"{request.split}_ims.npy rows"
    if short:
        log(
            f"note: {short} of {len(counts)} images have fewer than {width} regions; their {written} are "
            "zero-padded to that width, and the SCAN/3SHNet loaders take every row as a region"
        )


def _export_header(kind: ArrayKind, source: _Source, num_images: int, recorded: dict | None) -> NpyHeader | None:
    """The imported file's header when it describes the array to write (then the bytes match);
    None: numpy writes a fresh header for :func:`_export_dtype`."""
    if recorded is None:
        return None
    header = NpyHeader.from_record(recorded)
    return header if header.shape == (num_images,) + source.item_shapes[kind.array] else None


def _export_dtype(kind: ArrayKind, stored: np.dtype) -> np.dtype:
    """The SCAN/3SHNet dtype of ``kind`` when the cache's values fit it exactly, else the cache's."""
    wanted = np.dtype(kind.export_dtype)
    return wanted if np.can_cast(stored, wanted, casting="safe") else stored


def _write_array(files: ShardRows, source: _Source, kind: ArrayKind, header: NpyHeader | None, path: Path) -> None:
    shape = (len(source.shards),) + source.item_shapes[kind.array]
    with atomic_path(path) as tmp:
        if header is None:
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=_export_dtype(kind, source.dtypes[kind.array]), shape=shape)
        else:
            with open(tmp, "wb") as handle:
                handle.write(header.raw)
                handle.truncate(len(header.raw) + int(np.prod(shape, dtype=np.int64)) * header.dtype.itemsize)
            order = "F" if header.fortran_order else "C"
            target = np.memmap(tmp, dtype=header.dtype, mode="r+", offset=len(header.raw), shape=shape, order=order)
        step = rows_per_chunk(int(np.prod(shape[1:], dtype=np.int64)) * max(target.dtype.itemsize, source.dtypes[kind.array].itemsize))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            target[start:stop] = files.read(source.stage, kind.array, source.shards[start:stop], source.rows[start:stop])
        target.flush()
        del target
