"""One training step of a small region model, run alone or under torchrun; rank 0 saves the loss,
the parameter gradients (after DistributedDataParallel's average) and the BatchNorm running
statistics to OUT, and every rank fails if gloo's threads outlive the process group. Used by
tests/test_trainer_distributed.py to compare N ranks with one process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from shnet.trainer import distributed
from shnet.cache.captions import read_captions, select_split
from shnet.cache.features import FeatureIndex
from shnet.trainer.data import TrainPairs, match_split, train_loader
from shnet.trainer.loss import HingeTripletLoss
from shnet.trainer.model import ModelConfig, build_model
from shnet.trainer.text_encoders import VocabularyTokenizer


def main(cache: str, captions_file: str, out: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    world = distributed.world_from_environment()
    device = distributed.start(world, torch.device("cpu"))
    step(cache, captions_file, out, batch_size, world, device)
    distributed.stop()
    left = gloo_threads()
    if left:
        sys.exit(f"rank {world.rank}: the process group's threads outlive it: {left}")


def gloo_threads() -> list[str]:
    """This process's gloo threads (Linux names them); none once the process group is freed."""
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else []
    return [name for name in names if "gloo" in name]


def step(cache: str, captions_file: str, out: str, batch_size: int, world: distributed.World, device: torch.device) -> None:
    torch.manual_seed(0)
    index = FeatureIndex([cache], "region")
    captions = match_split(select_split(read_captions(captions_file), "train"), index, "error", print)
    tokenizer = VocabularyTokenizer.build(captions.captions)
    config = ModelConfig(embed_size=32, region_dim=index.feature_dim, num_classes=index.num_classes, vocab_size=tokenizer.vocab_size, word_dim=16)
    model = build_model(config).to(device)
    trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world.distributed else model
    pairs = TrainPairs(index.reader(captions.images), captions, tokenizer, seed=3, region_dropout=0.2)
    batch = next(iter(train_loader(pairs, batch_size, 0, seed=3, rank=world.rank, ranks=world.size)))
    trained.train()
    images, texts = trained(batch["images"], batch["tokens"], batch["token_lengths"])
    loss = HingeTripletLoss(0.2)(distributed.gather_rows(images), distributed.gather_rows(texts), hardest=True)
    loss.backward()
    if world.is_main:
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        running = {name: b.clone() for name, b in model.named_buffers() if "running" in name}
        torch.save({"loss": loss.item(), "grads": grads, "running": running}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
