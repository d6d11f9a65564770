"""The GPU check suite: one script, under 8 minutes on one GPU, that measures and prints

1. training samples/s of the region model (BiGRU; BERT too with --bert-path) with bf16 autocast,
   fed from a synthetic cache streamed from HDF5 and held --in-memory, the data-bound fraction and
   the projected time of one COCO epoch (566,435 image-caption pairs);
2. regions-stage images/s (random-initialised ResNet-101 BUTD detector) at batch 1 and batched, in
   fp32 and fp16 autocast, and the fp16 vs fp32 agreement of boxes and features;
3. panoptic images/s (a random-initialised Mask2Former, Swin-T sized);
4. bf16 vs fp32 agreement of the model's image and caption embeddings.

    python benchmarks/gpu_suite.py                      # on a GPU machine; prints a Markdown table at the end
    python benchmarks/gpu_suite.py --bert-path /models/bert-base-uncased
    python benchmarks/gpu_suite.py --reduced            # small sizes on the CPU (what CI runs)

Without a GPU the script runs in the reduced mode on the CPU, so that it keeps working; its figures
then say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _images import write_image_set  # noqa: E402
from panoptic_throughput import bare_loop, build_model_folder  # noqa: E402
from regions_throughput import bare_seconds_per_image, prepared_images  # noqa: E402
from train_throughput import build_data, fed_training  # noqa: E402

COCO_TRAIN_PAIRS = 566_435
FULL = dict(
    train_images=4096, regions=36, feature_dim=2048, embed_size=1024, batch_size=256, steps=20, workers=8,
    region_images=32, depth=101, min_size=600, max_size=1000, post_nms_topk=300, num_boxes=36, region_batch=8,
    panoptic_images=32, panoptic_size="swin-t", shortest_edge=800,
)  # fmt: skip
REDUCED = dict(
    train_images=48, regions=8, feature_dim=32, embed_size=32, batch_size=16, steps=1, workers=0,
    region_images=2, depth=50, min_size=128, max_size=192, post_nms_topk=8, num_boxes=4, region_batch=2,
    panoptic_images=1, panoptic_size="tiny", shortest_edge=64,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="small sizes on the CPU (automatic without a GPU)")
    parser.add_argument("--bert-path", type=Path, help="a local bert-base-uncased folder: also measure the BERT model")
    args = parser.parse_args()
    args.reduced = args.reduced or not torch.cuda.is_available()
    args.device = torch.device("cpu" if args.reduced else "cuda")
    args.sizes = argparse.Namespace(**(REDUCED if args.reduced else FULL))
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training(args, root: Path, rows: list) -> None:
    """Samples/s fed from HDF5 and from memory, for each text encoder; the bf16 embedding agreement."""
    from shnet.trainer.data import TrainPairs, train_loader
    from shnet.trainer.model import ModelConfig, build_model
    from shnet.trainer.text_encoders import BertTokenizerAdapter

    size = args.sizes
    data_args = argparse.Namespace(images=size.train_images, feature_dim=size.feature_dim, regions=size.regions, shard_size=512)
    started = time.perf_counter()
    index, captions, vocabulary = build_data(root, data_args)
    print(f"synthetic cache: {size.train_images} images x {size.regions} x {size.feature_dim}-d ({time.perf_counter() - started:.0f}s to write)")
    encoders = [("bigru", vocabulary, {})]
    if args.bert_path:
        encoders.append(("bert", BertTokenizerAdapter.from_folder(args.bert_path), {"bert_path": str(args.bert_path)}))
    memory = index.reader(captions.images)
    memory.load_in_memory()
    for name, tokenizer, extra in encoders:
        config = ModelConfig(embed_size=size.embed_size, region_dim=size.feature_dim, text_encoder=name, vocab_size=vocabulary.vocab_size, **extra)
        for source, reader in (("HDF5", index.reader(captions.images)), ("in memory", memory)):
            torch.manual_seed(0)
            model = build_model(config).to(args.device).train()
            loader = train_loader(TrainPairs(reader, captions, tokenizer, seed=0), size.batch_size, size.workers, seed=0, pin_memory=args.device.type == "cuda")
            rate, waited = fed_training(model, loader, args.device, size.steps)
            hours = COCO_TRAIN_PAIRS / rate / 3600
            rows.append((f"train {name}, {source}", f"{rate:.0f} samples/s", f"data-bound {waited:.1%}, COCO epoch {hours:.2f} h"))
            print(rows[-1])
        rows.append(embedding_agreement(model, loader, args.device, name))
        print(rows[-1])


def embedding_agreement(model, loader, device: torch.device, name: str) -> tuple:
    """Cosine similarity of the embeddings of one batch under bf16 autocast and in fp32 (eval mode)."""
    model.eval()
    batch = next(iter(loader))
    images = {k: v.to(device) for k, v in batch["images"].items()}
    tokens = batch["tokens"].to(device)
    with torch.inference_mode():
        exact = model(images, tokens, batch["token_lengths"])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            fast = model(images, tokens, batch["token_lengths"])
    cosine = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).min().item() for a, b in zip(exact, fast)]
    return (f"embeddings {name}, bf16 vs fp32", f"min cosine {min(cosine):.5f}", "image and caption embeddings of one batch")


def regions(args, root: Path, rows: list) -> None:
    """Detector images/s at batch 1 and batched, fp32 and fp16; fp16 vs fp32 boxes and features."""
    from shnet.pipeline.models.butd.weights import build_detector
    from shnet.pipeline.models.butd.extract import SelectionOptions
    from shnet.devices import autocast, place_model

    size = args.sizes
    options = SelectionOptions("caffe", size.num_boxes, size.num_boxes, 0.2, 0.3, 6000, size.post_nms_topk, 0.7)
    folder = write_image_set(root / "region-images", size.region_images, size=[(480, 640), (427, 640), (640, 480)])
    prepared = prepared_images(folder, size.min_size, size.max_size)
    model = place_model(build_detector("random", size.depth, False)[0], args.device.type)
    exact_context, fast_context = contextlib.nullcontext(), autocast(args.device.type, "float16")
    bare_seconds_per_image(model, prepared[:1], options, 1, exact_context)  # warm-up
    results = {}
    for precision, context in (("fp32", exact_context), ("fp16", fast_context)):
        for batch in (1, size.region_batch):
            synchronize(args.device)
            seconds, found = bare_seconds_per_image(model, prepared, options, batch, context)
            results[precision] = found
            rows.append((f"regions {precision}, batch {batch}", f"{1 / seconds:.1f} images/s", f"ResNet-{size.depth}, {size.post_nms_topk} proposals"))
            print(rows[-1])
    same = [a.boxes.shape == b.boxes.shape and np.allclose(a.boxes, b.boxes, atol=0.5) for a, b in zip(results["fp32"], results["fp16"])]
    cosines = [
        float(((a.features * b.features).sum(1) / (np.linalg.norm(a.features, axis=1) * np.linalg.norm(b.features, axis=1) + 1e-12)).min())
        for a, b, ok in zip(results["fp32"], results["fp16"], same)
        if ok and len(a.features)
    ]
    rows.append(("regions fp16 vs fp32", f"same boxes {sum(same)}/{len(same)}", f"min feature cosine {min(cosines, default=float('nan')):.4f}"))
    print(rows[-1])


def panoptic(args, root: Path, rows: list) -> None:
    size = args.sizes
    folder = write_image_set(root / "panoptic-images", size.panoptic_images, size=(480, 640))
    build_model_folder(root / "mask2former", size.panoptic_size, size.shortest_edge)
    seconds = bare_loop(folder, root / "mask2former", 4 if not args.reduced else 1, torch.get_num_threads(), args.device.type)
    rows.append((f"panoptic ({size.panoptic_size} Mask2Former)", f"{1 / seconds:.1f} images/s", f"shortest edge {size.shortest_edge}"))
    print(rows[-1])


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "CPU (reduced mode: not GPU figures)"
    print(f"device: {name}; torch {torch.__version__}")
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        training(args, root / "cache", rows)
        regions(args, root, rows)
        panoptic(args, root, rows)
    print(f"\n| measure ({name}) | figure | notes |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nsuite_seconds={time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
