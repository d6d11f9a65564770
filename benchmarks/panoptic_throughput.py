"""Panoptic-stage throughput through the whole extract pipeline versus the bare model loop, and the
layout stage's images/s.

The model is a random-initialised Mask2Former saved to a local folder (``--size tiny``: a ~0.4M
parameter toy; ``--size swin-t``: the Swin-T Mask2Former architecture, ~47M parameters, the smallest
published COCO-panoptic configuration) with its image processor (shortest edge ``--shortest-edge``).

- bare: one process, the same threads: decode, the processor, the model over batches of equal-size
  images, the library's ``post_process_panoptic_segmentation`` to full resolution (stuff fused);
  model load and one warm-up batch not timed. This is the loop a user would write by hand, in a
  process set up as an extract worker's is (``setup_process``: glibc's allocator keeping large buffers and freed memory in one heap, thread
  pools pinned), so that the ratio measures the pipeline, not the allocator: in a plain process the
  Swin-T loop ran 1.5-3x slower (8 images at shortest edge 256, load ~3).
- pipeline: a real ``shnet extract --stages panoptic`` (probe included) on an embedded LocalCluster,
  timed from the command start to its end (cluster start, model load, HDF5/Parquet writes included).
- layout: ``shnet extract --stages layout`` on that cache; images / the layout shards' own seconds.

    python benchmarks/panoptic_throughput.py [--images 48] [--size swin-t] [--device cpu|cuda] [--shard-size 8] [--repeats 1]

Also printed: the time from the command's start to its first stored panoptic shard.
Last line: pipeline_efficiency=<bare s/img / pipeline s/img>, whole wall time  (goal >= 0.9)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _images import first_shard_seconds, write_image_set  # noqa: E402

SIZES = {
    "tiny": dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], queries=20, hidden=32, feedforward=64, encoder_layers=1, decoder_layers=2, heads=2),
    "swin-t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], queries=100, hidden=256, feedforward=1024, encoder_layers=6, decoder_layers=10, heads=8),
}


def build_model_folder(folder: Path, size: str, shortest_edge: int) -> int:
    """Save a random-initialised Mask2Former with the 133 COCO panoptic labels; returns its parameter count."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    from shnet.data import coco_panoptic_categories

    spec = SIZES[size]
    id2label = {c.index: c.name for c in coco_panoptic_categories()}
    backbone = SwinConfig(embed_dim=spec["embed_dim"], depths=spec["depths"], num_heads=spec["num_heads"], window_size=7,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, num_queries=spec["queries"], hidden_dim=spec["hidden"],
        mask_feature_size=spec["hidden"], feature_size=spec["hidden"], encoder_feedforward_dim=spec["feedforward"],
        dim_feedforward=spec["feedforward"] * 2, encoder_layers=spec["encoder_layers"], decoder_layers=spec["decoder_layers"],
        num_attention_heads=spec["heads"], id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": shortest_edge, "longest_edge": shortest_edge * 1333 // 800}).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def bare_loop(folder: Path, model_dir: Path, batch_size: int, threads: int, device: str) -> float:
    """Seconds per image of the hand-written loop."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    from shnet.data import coco_panoptic_categories
    from shnet.pipeline.images import decode_image, discover_images
    from shnet.pipeline.worker import setup_process

    device = setup_process(threads, device)
    model = AutoModelForUniversalSegmentation.from_pretrained(model_dir).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    stuff = {c.index for c in coco_panoptic_categories() if not c.is_thing}
    paths = discover_images([folder])["path"].tolist()

    def run(batch_paths: list[str]) -> None:
        images = [decode_image(p) for p in batch_paths]
        inputs = processor(images=images, return_tensors="pt").to(device)
        out = model(**inputs)
        results = processor.post_process_panoptic_segmentation(out, label_ids_to_fuse=stuff, target_sizes=[im.shape[:2] for im in images])
        [r["segmentation"].cpu().numpy() for r in results]

    with torch.inference_mode():
        run(paths[:batch_size])  # warm-up, not timed
        start = time.perf_counter()
        for i in range(0, len(paths), batch_size):
            run(paths[i : i + batch_size])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(paths)


def extract(folder: Path, cache: Path, stages: str, model_dir: Path, batch_size: int, workers: int, device: str, shard_size: int) -> tuple[float, float]:
    """Seconds of the whole command, and from its start to the first stored shard of ``stages``."""
    command = [
        sys.executable, "-m", "shnet", "extract", str(folder), "-o", str(cache), "--stages", stages, "--profile", "panoptic-coco",
        "--set", f"panoptic.model={model_dir}", "--workers", str(workers), "--batch-size", str(batch_size), "--device", device, "--shard-size", str(shard_size),
    ]
    started = time.time()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, first_shard_seconds(cache, stages, started)


def stage_seconds(cache: Path, stage: str) -> float:
    return sum(json.loads(p.read_text())["seconds"] for p in (cache / stage).glob("*.done"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", choices=sorted(SIZES), default="swin-t")
    parser.add_argument("--shortest-edge", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shard-size", type=int, default=8, help="pipeline shard size (the first stored shard holds this many images)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate bare and pipeline runs this many times; best of each")
    args = parser.parse_args()
    import shnet.pipeline.models  # noqa: F401 - torchvision CPU fallbacks before transformers loads it

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_set(Path(tmp) / "images", args.images)
        model_dir = Path(tmp) / "mask2former"
        params = build_model_folder(model_dir, args.size, args.shortest_edge)
        bare = piped = in_stage = first = float("inf")
        for repeat in range(args.repeats):
            bare = min(bare, bare_loop(folder, model_dir, args.batch_size, cores, args.device))
            cache = Path(tmp) / f"cache{repeat}"
            wall, seconds = extract(folder, cache, "panoptic", model_dir, args.batch_size, 1, args.device, args.shard_size)
            piped, first = min(piped, wall / args.images), min(first, seconds)
            in_stage = min(in_stage, stage_seconds(cache, "panoptic") / args.images)
        layout_wall, _ = extract(folder, cache, "layout", model_dir, args.batch_size, 1, args.device, args.shard_size)
        layout_rate = args.images / stage_seconds(cache, "layout")
    print(f"images={args.images} (480x640) model=Mask2Former-{args.size} params={params / 1e6:.1f}M shortest_edge={args.shortest_edge} "
          f"device={args.device} cores={cores} batch={args.batch_size}")
    print(f"bare_s_per_img={bare:.4f}  (decode + processor + model + post_process_panoptic_segmentation, {cores} threads, one process)")
    print(f"pipeline_s_per_img={piped:.4f}  (whole `shnet extract --stages panoptic` wall time, 1 worker x {cores} threads, best of {args.repeats})")
    print(f"first_shard_s={first:.2f}  (command start to the first stored panoptic shard of {min(args.images, args.shard_size)} images)")
    print(f"stage_s_per_img={in_stage:.4f}  (inside the panoptic shard tasks)")
    print(f"layout_img_per_s={layout_rate:.1f}  (layout shard tasks; whole command {layout_wall:.1f}s incl. cluster start)")
    print(f"load_average={os.getloadavg()[0]:.1f}")
    print(f"pipeline_efficiency={bare / piped:.3f}")


if __name__ == "__main__":
    main()
