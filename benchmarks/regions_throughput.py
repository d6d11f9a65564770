"""Stage ``regions`` throughput: the bare detector forward versus `shnet extract --stages regions`.

Bare: the random-initialised detector over images decoded and preprocessed beforehand (decode and
preprocess excluded), batched as the stage batches them (the detector takes them one at a time), in
one process with all cores' threads, set up as an extract worker's is (``setup_process``: glibc's
allocator keeping large buffers and freed memory in one heap, threads pinned), so that the ratio measures the pipeline, not the allocator.
Pipeline: a real `shnet extract --stages regions` over the same images with one worker holding the
same threads, timed from command start to end (cluster start, model build, decoding, HDF5 writes
included). ``--sizes`` gives the image sizes in turn (several sizes: every batch mixes them). On a
CUDA machine the bare forward is also timed with fp16 autocast, with the largest feature deviation
autocast causes.

    python benchmarks/regions_throughput.py [--images 8] [--depth 101] [--min-size 600] [--max-size 1000]
                                           [--post-nms-topk 100] [--batch-size 4] [--device cpu] [--repeats 1]
                                           [--sizes 480x640,375x500,...] [--shard-size 8]

Also printed: the time from the command's start to its first stored regions shard.
Last line: pipeline_efficiency=<bare s/img / pipeline s/img>, whole wall time  (goal >= 0.9)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _images import first_shard_seconds, write_image_set  # noqa: E402


def prepared_images(folder: Path, min_size: int, max_size: int) -> list:
    from shnet.pipeline.images import decode_image, discover_images
    from shnet.pipeline.models.butd.preprocess import preprocess

    return [preprocess(decode_image(p), min_size, max_size, "caffe") for p in discover_images([folder])["path"].tolist()]


def bare_seconds_per_image(model, prepared, options, batch_size: int, autocast) -> tuple[float, list]:
    import torch

    from shnet.pipeline.models.butd.extract import extract_regions

    regions = []
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prepared), batch_size):
        regions += extract_regions(model, prepared[i : i + batch_size], options, autocast)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(prepared), regions


def pipeline_seconds_per_image(folder: Path, cache: Path, args, count: int) -> tuple[float, float, float]:
    command = [
        sys.executable, "-m", "shnet", "extract", str(folder), "-o", str(cache), "--stages", "regions",
        "--set", "regions.weights=random", "--set", f"regions.depth={args.depth}",
        "--set", f"regions.min_size={args.min_size}", "--set", f"regions.max_size={args.max_size}",
        "--set", f"regions.post_nms_topk={args.post_nms_topk}", "--set", f"regions.num_boxes={args.num_boxes}",
        "--workers", "1", "--batch-size", str(args.batch_size), "--shard-size", str(min(count, args.shard_size)), "--device", args.device,
    ]  # fmt: skip
    started = time.time()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = (time.perf_counter() - start) / count
    return wall, stage_seconds_per_image(cache), first_shard_seconds(cache, "regions", started)


def stage_seconds_per_image(cache: Path) -> float:
    """What the stage itself spent per image inside the worker (decode + forward + selection)."""
    import pandas as pd

    return float(pd.read_parquet(cache / "regions" / "table")["seconds"].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--min-size", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=1000)
    parser.add_argument("--post-nms-topk", type=int, default=100, help="proposals through the res5 head per image (extractors: 300)")
    parser.add_argument("--num-boxes", type=int, default=36)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shard-size", type=int, default=8, help="pipeline shard size (the first stored shard holds this many images)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate bare and pipeline runs this many times; best of each")
    parser.add_argument("--sizes", default="480x640", help="comma-separated HxW image sizes, taken in turn")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]

    import numpy as np

    from shnet.pipeline.models.butd.weights import build_detector
    from shnet.pipeline.models.butd.extract import SelectionOptions
    from shnet.devices import autocast, place_model

    from shnet.pipeline.worker import setup_process

    cores = len(os.sched_getaffinity(0))
    setup_process(cores, args.device)  # the bare loop in a process set up as an extract worker's is
    options = SelectionOptions("caffe", args.num_boxes, args.num_boxes, 0.2, 0.3, 6000, args.post_nms_topk, 0.7)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_set(Path(tmp) / "images", args.images, size=sizes)
        prepared = prepared_images(folder, args.min_size, args.max_size)
        model = place_model(build_detector("random", args.depth, False)[0], args.device)
        bare_seconds_per_image(model, prepared[:1], options, 1, contextlib.nullcontext())  # warm-up
        bare, exact = bare_seconds_per_image(model, prepared, options, args.batch_size, contextlib.nullcontext())
        piped, in_stage, first = pipeline_seconds_per_image(folder, Path(tmp) / "cache0", args, len(prepared))
        for repeat in range(1, args.repeats):
            bare = min(bare, bare_seconds_per_image(model, prepared, options, args.batch_size, contextlib.nullcontext())[0])
            again, again_in_stage, again_first = pipeline_seconds_per_image(folder, Path(tmp) / f"cache{repeat}", args, len(prepared))
            piped, in_stage, first = min(piped, again), min(in_stage, again_in_stage), min(first, again_first)
        resized = sorted({p.resized_hw for p in prepared})
        print(f"images={args.images} ({args.sizes} -> {resized}) depth={args.depth} post_nms_topk={args.post_nms_topk} "
              f"num_boxes={args.num_boxes} batch={args.batch_size} device={args.device} threads={cores}")
        print(f"bare_s_per_img={bare:.3f}  (detector forward + selection, fp32, best of {args.repeats})")
        if args.device == "cuda":
            mixed, fast = bare_seconds_per_image(model, prepared, options, args.batch_size, autocast("cuda", "float16"))
            same = [a.boxes.shape == b.boxes.shape and np.allclose(a.boxes, b.boxes, atol=0.5) for a, b in zip(exact, fast)]
            deviation = max(float(np.abs(a.features - b.features).max()) for a, b in zip(exact, fast) if a.features.shape == b.features.shape)
            print(f"bare_autocast_s_per_img={mixed:.3f}")
            print(f"autocast: same boxes in {sum(same)}/{len(same)} images, max |feature fp32 - fp16| = {deviation:.4f}")
    print(f"pipeline_s_per_img={piped:.3f}  (whole `shnet extract --stages regions` wall time, 1 worker x {cores} threads, best of {args.repeats})")
    print(f"first_shard_s={first:.2f}  (command start to the first stored regions shard of {min(args.images, args.shard_size)} images)")
    print(f"stage_s_per_img={in_stage:.3f}  (inside the worker: decode, forward, selection; the rest is start-up)")
    print(f"load_average={os.getloadavg()[0]:.1f}  (the figures are only comparable on an otherwise idle machine)")
    print(f"pipeline_efficiency={bare / piped:.3f}")


if __name__ == "__main__":
    main()
