"""Training throughput of the 3SHNet region model on a synthetic HDF5 cache.

Prints the data loader's samples/s on its own, the model's training samples/s on a batch already
in memory (CPU, and the GPU when there is one), then runs real training steps fed by the loader
and reports the share of step time spent waiting for the next batch. The last line is
``data_bound_fraction=<share>`` (goal: <= 0.10).

    python benchmarks/train_throughput.py                        # paper sizes: 36 x 2048-d regions, D=1024
    python benchmarks/train_throughput.py --images 256 --steps 3 --batch-size 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shnet.cache.captions import CaptionSet
from shnet.cache.features import FeatureIndex
from shnet.trainer.data import TrainPairs, train_loader
from shnet.devices import autocast
from shnet.trainer.loss import HingeTripletLoss
from shnet.trainer.model import ModelConfig, build_model
from shnet.trainer.synthetic import write_concept_cache
from shnet.trainer.text_encoders import VocabularyTokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="images in the synthetic cache (5 captions each)")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--embed-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--cache", type=Path, help="reuse (or create) the synthetic cache here instead of a temporary folder")
    return parser.parse_args()


def build_data(root: Path, args: argparse.Namespace):
    if not (root / "captions.parquet").exists():
        frame = write_concept_cache(
            root, {"train": args.images}, feature_dim=args.feature_dim, num_boxes=args.regions, shard_size=args.shard_size
        )
        frame.to_parquet(root / "captions.parquet")
    import pandas as pd

    frame = pd.read_parquet(root / "captions.parquet")
    codes, images = pd.factorize(frame["image_id"])
    captions = CaptionSet(list(images), frame["caption"].tolist(), codes, "train", str(root))
    index = FeatureIndex([root], "region")
    tokenizer = VocabularyTokenizer.build(captions.captions)
    return index, captions, tokenizer


def loader_samples_per_second(pairs: TrainPairs, args: argparse.Namespace) -> tuple[float, dict]:
    """Samples/s of one epoch through the training loader (after its first batch), and a batch."""
    iterator = iter(train_loader(pairs, args.batch_size, args.workers, seed=0))
    batch, batches = next(iterator), 0  # the first batch waits for the workers to start
    started = time.perf_counter()
    for batch in iterator:
        batches += 1
    return batches * args.batch_size / (time.perf_counter() - started), batch


def model_samples_per_second(model, batch, device, steps: int) -> float:
    """Training samples/s on one batch already on ``device`` (no data loading)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    loss_fn = HingeTripletLoss(0.2)
    images = {k: v.to(device) for k, v in batch["images"].items()}
    tokens = batch["tokens"].to(device)

    def step():
        with autocast(device, "bfloat16"):
            a, b = model(images, tokens, batch["token_lengths"])
        loss = loss_fn(a.float(), b.float(), True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    step()  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(tokens) / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.cache or Path(tmp) / "cache"
        started = time.perf_counter()
        index, captions, tokenizer = build_data(root, args)
        print(
            f"cache: {captions.num_images} images x {args.regions} regions x {args.feature_dim}-d fp16 in {root} "
            f"({time.perf_counter() - started:.1f}s to prepare)"
        )
        pairs = TrainPairs(index.reader(captions.images), captions, tokenizer, seed=0)

        # 1. The loader alone: HDF5 reads (or RAM), region dropout, tokenising, collation.
        memory = index.reader(captions.images)
        memory.load_in_memory()
        for source, reader in (("HDF5", pairs.reader), ("in memory", memory)):
            rate, batch = loader_samples_per_second(TrainPairs(reader, captions, tokenizer, seed=0), args)
            print(f"data loader ({args.workers} workers, {source}): {rate:.0f} samples/s")

        # 2. The model alone on a resident batch.
        config = ModelConfig(embed_size=args.embed_size, region_dim=args.feature_dim, vocab_size=tokenizer.vocab_size)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        for device in devices:
            torch.manual_seed(0)
            model = build_model(config).to(device).train()
            rate = model_samples_per_second(model, batch, device, args.steps)
            print(f"model training on {device.type}{' (bf16 autocast)' if device.type == 'cuda' else ''}: {rate:.1f} samples/s")

        # 3. Real steps fed by the HDF5 loader: how long does each step wait for its batch?
        device = devices[-1]
        torch.manual_seed(0)
        model = build_model(config).to(device).train()
        rate, waited = fed_training(model, train_loader(pairs, args.batch_size, args.workers, seed=0), device, args.steps)
        print(f"training fed by the loader on {device.type}: {rate:.1f} samples/s, {waited:.1%} of the step time waiting for data")
        print(f"data_bound_fraction={waited:.3f}")


def fed_training(model, loader, device, steps: int) -> tuple[float, float]:
    """Training steps fed by ``loader``: (samples/s, share of the step time spent waiting for a batch).
    The first batch pays for worker start-up and is not timed; the loader wraps round its epochs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    loss_fn = HingeTripletLoss(0.2)
    waited = total = 0.0
    done, samples, epoch = 0, 0, 1
    loader.batch_sampler.set_epoch(epoch)
    iterator = iter(loader)
    next(iterator)
    while done < steps:
        step_started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            epoch += 1
            loader.batch_sampler.set_epoch(epoch)
            iterator = iter(loader)
            continue
        got_batch = time.perf_counter()
        images = {k: v.to(device, non_blocking=True) for k, v in batch["images"].items()}
        with autocast(device, "bfloat16"):
            a, b = model(images, batch["tokens"].to(device), batch["token_lengths"])
        loss = loss_fn(a.float(), b.float(), True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        float(loss.detach())  # synchronises with the GPU
        waited += got_batch - step_started
        total += time.perf_counter() - step_started
        done, samples = done + 1, samples + len(batch["tokens"])
    return samples / total, waited / total


if __name__ == "__main__":
    main()
