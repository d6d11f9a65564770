"""Grid-stage throughput through the whole extract pipeline versus a bare loop over the same work.

The pipeline run is a real `shnet extract --stages grid` (probe included) on an embedded
LocalCluster, timed from the command start to its end (cluster start, model loads, decoding, HDF5
writes included). The bare loop runs the same model over the same images in one process with the
same total number of threads: decode, preprocess, batched forward; model build not timed; the
process set up as an extract worker's is (``setup_process``: glibc's allocator keeping large buffers and freed memory in one heap, thread
pools pinned), and the model placed as the stage places it (``place_model``: channels-last), so that
the ratio measures the pipeline, not the allocator or the memory layout.

    python benchmarks/extract_throughput.py [--images 96] [--model resnet50] [--input-size 512] [--repeats 1] [--workers 1]

The pipeline runs one worker holding every core's threads by default, the bare loop's layout (as
the regions and panoptic benchmarks run theirs); ``--workers N`` measures another layout against
the same bare loop (``shnet extract``'s own default on a CPU is one worker per core, up to 4).

Also printed: the time from the command's start to its first stored grid shard.
Last line: pipeline_efficiency=<pipeline img/s / bare img/s>, whole wall time  (goal >= 0.9 on CPU)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _images import first_shard_seconds, write_image_set  # noqa: E402


def bare_loop(folder: Path, model_name: str, input_size: int, batch_size: int, threads: int) -> float:
    """Images per second of the hand-written loop (model build not timed)."""
    import numpy as np
    import torch

    from shnet.devices import place_model
    from shnet.pipeline.images import decode_image, discover_images
    from shnet.pipeline.models.grid import build_grid_backbone, preprocess
    from shnet.pipeline.worker import setup_process

    setup_process(threads, "cpu")
    model = place_model(build_grid_backbone(model_name, "random"), "cpu")
    paths = discover_images([folder])["path"].tolist()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = [preprocess(decode_image(p, draft_size=input_size), input_size, "stretch", model.mean, model.std, model.stride)[0]
                     for p in paths[i : i + batch_size]]
            model(torch.from_numpy(np.stack(batch))).to(torch.float16).numpy()
    return len(paths) / (time.perf_counter() - start)


def pipeline(folder: Path, cache: Path, model_name: str, input_size: int, batch_size: int, workers: int) -> tuple[float, float]:
    """Images per second over the whole command, and seconds to its first stored grid shard."""
    count = len(list(folder.glob("*.jpg")))
    command = [
        sys.executable, "-m", "shnet", "extract", str(folder), "-o", str(cache), "--stages", "grid",
        "--set", f"grid.model={model_name}", "--set", "grid.weights=random", "--set", f"grid.input_size={input_size}",
        "--workers", str(workers), "--batch-size", str(batch_size), "--shard-size", str(max(batch_size, count // (workers * 4))),
    ]
    started = time.time()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return count / (time.perf_counter() - start), first_shard_seconds(cache, "grid", started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="pipeline workers (default 1: the bare loop's layout, one process holding every core's threads)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate bare and pipeline runs this many times; best of each")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    workers = args.workers
    bare = piped = first = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_set(Path(tmp) / "images", args.images)
        for repeat in range(args.repeats):
            bare = max(bare, bare_loop(folder, args.model, args.input_size, args.batch_size, cores))
            rate, seconds = pipeline(folder, Path(tmp) / f"cache{repeat}", args.model, args.input_size, args.batch_size, workers)
            piped, first = max(piped, rate), min(seconds, first or seconds)
    print(f"images={args.images} model={args.model} input={args.input_size} cores={cores} pipeline_workers={workers}")
    print(f"bare_loop_img_per_s={bare:.3f}  ({cores} torch threads, one process, best of {args.repeats})")
    print(f"pipeline_img_per_s={piped:.3f}  (whole `shnet extract --stages grid` wall time, best of {args.repeats})")
    print(f"first_shard_s={first:.2f}  (command start to the first stored grid shard)")
    print(f"load_average={os.getloadavg()[0]:.1f}")
    print(f"pipeline_efficiency={piped / bare:.3f}")


if __name__ == "__main__":
    main()
