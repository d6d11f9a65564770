"""``shnet inspect`` (what a cache holds) and ``shnet verify`` (is every shard whole and consistent)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..errors import CacheError
from ..fileio import TEMPORARY_GLOB
from . import schema
from .store import Cache


@dataclass
class StageSummary:
    name: str
    shards_done: int
    shards_total: int
    images_ok: int
    images_error: int
    arrays: dict  # name -> {"shape": per-image shape, "dtype": str}
    bytes_on_disk: int
    config: dict
    damaged: dict = field(default_factory=dict)  # shard -> what is wrong (done marker present, files not as vouched)


def summarise_cache(cache: Cache) -> tuple[dict, list[StageSummary]]:
    images = cache.images()
    overview = {
        "cache": str(cache.root),
        "format_version": cache.record["format_version"],
        "roots": cache.record.get("roots", []),
        "images": len(images),
        "images_ok": int((images["status"] == "ok").sum()),
        "images_error": int((images["status"] == "error").sum()),
        "images_pending": int((images["status"] == "pending").sum()),
        "shards": cache.num_shards,
        "shard_size": cache.shard_size,
        "captions": cache.record.get("captions", {}).get("captions", {}),  # split -> count (an imported cache)
    }
    stages = []
    for name in cache.recorded_stages():
        damaged = cache.damaged_shards(name)
        done = [shard for shard in cache.done_shards(name) if shard not in damaged]
        arrays, size, ok, errors = {}, 0, 0, 0
        for shard in done:
            marker = cache.done_marker(name, shard)
            ok += marker.get("ok", 0)
            errors += marker.get("errors", 0)
            size += cache.array_path(name, shard).stat().st_size + cache.table_path(name, shard).stat().st_size
        arrays = _array_shapes(cache, name, done, damaged)
        stages.append(StageSummary(name, len(done), cache.num_shards, ok, errors, arrays, size, cache.stage_config(name) or {}, damaged))
    return overview, stages


def _array_shapes(cache: Cache, stage: str, done: list[int], damaged: dict) -> dict:
    """Per-image shape and dtype of each array, from the first shard that opens (one that does not
    is counted as damaged)."""
    for shard in done:
        try:
            with cache.open_arrays(stage, shard) as h5:
                return {key: {"shape": list(h5[key].shape[1:]), "dtype": str(h5[key].dtype)} for key in h5}
        except CacheError as exc:
            damaged[shard] = str(exc)
    return {}


def describe_image(cache: Cache, image_id: str) -> dict:
    """Everything the cache holds for one image: its images.parquet row and per stage its arrays."""
    images = cache.images()
    match = images[images["image_id"] == image_id]
    if match.empty:
        close = images["image_id"][images["image_id"].str.contains(image_id.split("/")[-1], regex=False)].head(5).tolist()
        raise CacheError(f"no image '{image_id}' in {cache.root}" + (f"; did you mean: {', '.join(close)}" if close else ""))
    info = {k: (v.item() if hasattr(v, "item") else v) for k, v in match.iloc[0].to_dict().items()}
    shard, row = int(info["shard"]), int(info["row"])
    stages = {}
    for name in cache.recorded_stages():
        if not cache.is_done(name, shard):
            stages[name] = "not extracted yet"
            continue
        table = cache.shard_table(name, shard)
        entry = {k: (v.item() if hasattr(v, "item") else v) for k, v in table[table["row"] == row].iloc[0].to_dict().items()}
        with cache.open_arrays(name, shard) as h5:
            for key in h5:
                value = h5[key][row]
                stat = {"shape": list(value.shape), "dtype": str(value.dtype)}
                if value.size and np.issubdtype(value.dtype, np.number):
                    as_float = value.astype(np.float64)
                    stat.update(min=float(as_float.min()), max=float(as_float.max()), mean=float(as_float.mean()))
                entry[key] = stat
        stages[name] = entry
    info["stages"] = stages
    return info


@dataclass
class VerifyResult:
    checked_shards: int = 0
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def verify_cache(cache: Cache, quick: bool = False) -> VerifyResult:
    """Open every shard of every stage and check it against its done marker (sizes and, unless
    ``quick``, the sha256 of every file), the tables and the plan."""
    result = VerifyResult()
    images = cache.images()
    if images["image_id"].duplicated().any():
        dup = images["image_id"][images["image_id"].duplicated()].head(3).tolist()
        result.problems.append(f"images.parquet lists some image_ids twice (e.g. {dup})")
    expected_rows = images.groupby("shard")["image_id"].apply(list).to_dict()
    leftovers = list(cache.root.rglob(TEMPORARY_GLOB))
    if leftovers:
        result.warnings.append(f"{len(leftovers)} temporary file(s) of an interrupted run (removed by the next extract), e.g. {leftovers[0]}")
    unvouched = 0
    for name in cache.recorded_stages():
        for shard in range(cache.num_shards):
            if not cache.is_done(name, shard):
                if cache.array_path(name, shard).exists():
                    result.warnings.append(f"{name} shard {shard}: arrays present without a done marker (will be redone)")
                continue
            result.checked_shards += 1
            problem = cache.shard_problem(name, shard, content=not quick)
            if problem:
                result.problems.append(f"{name} shard {shard}: {problem}; {cache.redo_hint(name, shard)}")
                if not cache.is_readable_marker(name, shard):
                    continue
            result.problems += [f"{name} shard {shard}: {p}" for p in _verify_shard(cache, name, shard, expected_rows.get(shard, []))]
            unvouched += "files" not in cache.done_marker(name, shard)
        incomplete = cache.num_shards - len(cache.done_shards(name))
        if incomplete:
            result.warnings.append(f"stage '{name}' is incomplete: {incomplete} of {cache.num_shards} shards not done")
    if unvouched:
        result.warnings.append(f"{unvouched} shard(s) have done markers of an older shnet (no sizes or sha256): their content was not checked against them")
    return result


def _verify_shard(cache: Cache, stage: str, shard: int, image_ids: list) -> list[str]:
    problems = []
    for path in (cache.array_path(stage, shard), cache.table_path(stage, shard)):
        if not path.exists():
            return [f"done marker present but {path.name} missing"]
    try:
        table = cache.shard_table(stage, shard)
    except CacheError as exc:
        return [str(exc)]
    marker = cache.done_marker(stage, shard)
    if len(table) != len(image_ids) or marker.get("rows") != len(image_ids):
        problems.append(f"{len(table)} table rows / marker {marker.get('rows')} for {len(image_ids)} planned images")
    if table["image_id"].duplicated().any():
        problems.append("table lists an image twice")
    ordered = table.sort_values("row")
    if list(ordered["image_id"]) != list(image_ids) or list(ordered["row"]) != list(range(len(image_ids))):
        problems.append("table rows do not match the planned images of this shard")
    ok_rows = ordered.loc[ordered["status"] == "ok", "row"].to_numpy()
    try:
        with h5py.File(cache.array_path(stage, shard), "r") as h5:
            if h5.attrs.get("stage") != stage or int(h5.attrs.get("shard", -1)) != shard:
                problems.append(f"file attributes say stage {h5.attrs.get('stage')!r} shard {h5.attrs.get('shard')}")
            config = json.loads(h5.attrs.get("config", "{}"))
            recorded = cache.stage_config(stage) or {}
            if config.get("weights_sha256", "") != recorded.get("weights_sha256", ""):
                problems.append("written with other weights than the cache record names")
            problems += _schema_problems(cache, stage, shard, h5, recorded)
            for key in h5:
                data = h5[key]
                if data.shape[0] != len(image_ids):
                    problems.append(f"array '{key}' has {data.shape[0]} rows for {len(image_ids)} images")
                    continue
                if np.issubdtype(data.dtype, np.floating) and len(ok_rows):
                    for start in range(0, len(ok_rows), 64):
                        block = data[np.sort(ok_rows[start : start + 64])]
                        if not np.isfinite(block).all():
                            problems.append(f"array '{key}' holds NaN/inf for ok images")
                            break
    except OSError as exc:
        problems.append(f"HDF5 file unreadable: {exc}")
    return problems


def _schema_problems(cache: Cache, stage: str, shard: int, h5, recorded: dict) -> list[str]:
    """The shard's per-image array shapes and dtypes against :mod:`shnet.cache.schema`, as one line."""
    imported = schema.is_imported(recorded)
    known = {}
    for other, symbols in schema.counting_stages(stage).items():
        sizes = _symbol_sizes(cache, other, shard)
        known.update({symbol: sizes[symbol] for symbol in symbols if symbol in sizes})
    mismatched = schema.check_arrays(stage, {key: (h5[key].shape[1:], h5[key].dtype) for key in h5}, imported, known)
    if not mismatched:
        return []
    fix = "import the .npy set again into a new cache with `shnet import`" if imported else cache.redo_hint(stage, shard)
    return [f"arrays not as the schema defines stage '{stage}': {'; '.join(mismatched)}. To fix: {fix}"]


def _symbol_sizes(cache: Cache, stage: str, shard: int) -> dict:
    """The schema's symbol sizes in one shard of ``stage``; none when it is not done or is damaged
    (a damaged shard is named on its own)."""
    if not cache.is_done(stage, shard) or cache.shard_problem(stage, shard):
        return {}
    try:
        with cache.open_arrays(stage, shard) as h5:
            return schema.symbol_sizes(stage, {key: (h5[key].shape[1:], h5[key].dtype) for key in h5})
    except CacheError:
        return {}
