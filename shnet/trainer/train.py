"""The training loop: the 3SHNet paper recipe on cached features, resumable epoch by epoch.

A run directory (:mod:`shnet.trainer.run`) holds ``options.json``, ``last.pth`` (every epoch),
``best.pth`` (best validation rSum), ``metrics.jsonl`` (one line per epoch), ``curves.png`` and, when
TensorBoard is installed, ``tensorboard/``. A resumed run restores model, optimizer, scheduler, epoch and the torch/numpy/
Python random states; data order and augmentation are functions of (seed, epoch, sample), so on
CPU a resumed run reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..devices import autocast, resolve_device
from ..errors import ShnetError
from ..fileio import atomic_copy, atomic_path, atomic_write_json
from ..cache.captions import CaptionSet, captions_source, read_captions, select_split
from .checkpoint import load_model, save_checkpoint
from . import distributed
from ..cache.features import FeatureIndex, FeatureReader
from .data import TrainPairs, match_split, train_loader
from .distributed import gather_rows
from .evaluate import encode_split, similarity_matrix
from .loss import HingeTripletLoss
from .metrics import CAPTIONS_PER_IMAGE, RECALL_AT, retrieval_metrics
from .model import ModelConfig, SHNet, build_model
from .options import RUNTIME_OPTIONS, TrainOptions
from .run import RunDir
from .text_encoders import BertTextEncoder, BertTokenizerAdapter, VocabularyTokenizer

def parameter_groups(model: SHNet, lr: float, bert_lr_factor: float) -> list[dict]:
    """The image encoder and the text head at ``lr``; BERT's own weights at ``lr * bert_lr_factor``."""
    bert = model.txt_enc.bert if isinstance(model.txt_enc, BertTextEncoder) else None
    bert_ids = {id(p) for p in bert.parameters()} if bert is not None else set()
    groups = [{"params": [p for p in model.parameters() if id(p) not in bert_ids], "lr": lr}]
    if bert is not None:
        groups.append({"params": list(bert.parameters()), "lr": lr * bert_lr_factor})
    return groups


def rng_states() -> dict:
    """The global random states, as tensors and plain values (a weights-only load reads them)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)), "pos": numpy_state["state"]["pos"]}
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {"key": numpy_state["state"]["key"].numpy().astype(np.uint32), "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunLog:
    """metrics.jsonl, TensorBoard (when installed) and curves.png of one run directory."""

    def __init__(self, run: RunDir, keep_epochs: int):
        self.run = run
        self.records = [r for r in run.read_metrics() if r["epoch"] < keep_epochs]
        # A run stopped between writing a line and its checkpoint leaves lines to replay: drop them.
        run.write_metrics(self.records)
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tensorboard = SummaryWriter(str(run.tensorboard), purge_step=keep_epochs)

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.run.write_metrics(self.records)
        if self.tensorboard is not None:
            epoch = record["epoch"]
            self.tensorboard.add_scalar("train/loss", record["train_loss"], epoch)
            self.tensorboard.add_scalar("train/lr", record["lr"], epoch)
            for direction in ("i2t", "t2i"):
                for key, value in record["val"][direction].items():
                    self.tensorboard.add_scalar(f"val/{direction}_{key}", value, epoch)
            self.tensorboard.add_scalar("val/rsum", record["val"]["rsum"], epoch)
            self.tensorboard.flush()
        plot_curves(self.records, self.run.curves)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_curves(records: list[dict], path: Path) -> None:
    """Training loss and validation recalls per epoch (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in records]
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    loss_axes, recall_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [r["train_loss"] for r in records], marker="o")
    loss_axes.set(title="training loss", xlabel="epoch", ylabel="hinge triplet loss per batch")
    for direction, style in (("i2t", "-"), ("t2i", "--")):
        for k in RECALL_AT:
            recall_axes.plot(epochs, [r["val"][direction][f"r{k}"] for r in records], style, marker=".", label=f"{direction} R@{k}")
    recall_axes.set(title="validation recall", xlabel="epoch", ylabel="%", ylim=(0, 100))
    recall_axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")


def validate(model: SHNet, reader: FeatureReader, captions: CaptionSet, tokenizer, options: TrainOptions, device: torch.device) -> dict:
    images, texts = encode_split(model, reader, captions, tokenizer, options.batch_size, options.workers, device)
    return retrieval_metrics(similarity_matrix(images, texts))


def train_one_epoch(model, loader, optimizer, loss_fn, hardest: bool, options: TrainOptions, device: torch.device, epoch: int) -> float:
    """One epoch; ``model`` may be a DistributedDataParallel wrapper: the loss then spans the global batch."""
    from tqdm import tqdm

    model.train()
    loader.batch_sampler.set_epoch(epoch)
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not options.progress, leave=False, dynamic_ncols=True, file=sys.stderr)
    for batch in bar:
        images = {k: v.to(device, non_blocking=True) for k, v in batch["images"].items()}
        tokens = batch["tokens"].to(device, non_blocking=True)
        with autocast(device, "bfloat16"):
            image_embeddings, text_embeddings = model(images, tokens, batch["token_lengths"])
        loss = loss_fn(gather_rows(image_embeddings.float()), gather_rows(text_embeddings.float()), hardest)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if options.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ShnetError(f"the training loss became {value} at epoch {epoch}, step {steps}; lower --lr or check the features")
        total, steps = total + value, steps + 1
        bar.set_postfix(loss=f"{value:.3f}")
    return total / max(steps, 1)


def resumed_options(saved: dict, given: TrainOptions, explicit: set[str]) -> TrainOptions:
    """The saved recipe with the runtime options the user gave now; refuse other changed options."""
    options = TrainOptions.from_dict(saved)
    changed = [n for n in sorted(explicit) if n not in RUNTIME_OPTIONS and getattr(given, n) != getattr(options, n)]
    if changed:
        listing = ", ".join(f"--{n.replace('_', '-')} (run: {getattr(options, n)!r}, given: {getattr(given, n)!r})" for n in changed)
        raise ShnetError(
            f"a resumed run keeps its recipe; these options differ from the run's: {listing}. Start a new --output to change them"
        )
    for name in RUNTIME_OPTIONS:
        if name in explicit or name == "output":
            setattr(options, name, getattr(given, name))
    return options


def train(options: TrainOptions, resume: bool = False, explicit: set[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (or, with ``resume``, continue) the run in ``options.output``; returns a summary.

    ``explicit``: the option names the user set on this invocation (a resumed run accepts changes to
    :data:`RUNTIME_OPTIONS` only). Under torchrun or srun every process calls this: each trains on
    its share of every global batch, rank 0 alone validates, logs and writes the run directory.
    """
    world = distributed.world_from_environment()
    if options.batch_size % world.size:
        if not world.is_main:
            distributed.leave_to_rank_zero()
        raise ShnetError(
            f"--batch-size {options.batch_size} is the global batch and does not split evenly over {world.size} processes; "
            f"give a multiple of {world.size}"
        )
    try:
        return _train(options, resume, explicit, log if world.is_main else _silent, world)
    finally:
        distributed.stop()


def _silent(message: str) -> None:
    """The log of ranks other than 0 (rank 0 speaks for the job)."""


def _train(options: TrainOptions, resume: bool, explicit: set[str] | None, log: Callable[[str], None], world: distributed.World) -> dict:
    run = RunDir(options.output)
    run_dir, last = run.root, run.last
    if resume:
        if not run.has_run():
            raise ShnetError(f"nothing to resume: {last} does not exist (start the run without --resume)")
        checkpoint = load_model(last)
        options = resumed_options(checkpoint.extra["options"], options, explicit or set())
    elif run.has_run():
        raise ShnetError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --output")
    options.world_size = world.size
    options.check()
    device = distributed.start(world, resolve_device(options.device))
    seed_everything(options.seed)

    options.captions = captions_source(options.captions, options.caches)
    table = read_captions(options.captions)
    index = FeatureIndex(options.caches, options.level)
    train_set = match_split(select_split(table, options.train_split), index, "drop", log)
    val_set = match_split(select_split(table, options.val_split), index, "drop", log).first_images(options.val_images)
    val_set.require_captions_per_image(CAPTIONS_PER_IMAGE)

    if resume:
        model, config, tokenizer = checkpoint.model, checkpoint.config, checkpoint.tokenizer
    else:
        if options.text_encoder == "bert":
            tokenizer = BertTokenizerAdapter.from_folder(options.bert_path)
        else:
            tokenizer = VocabularyTokenizer.build(train_set.captions)
        config = ModelConfig(
            level=options.level,
            embed_size=options.embed_size,
            region_dim=index.feature_dim,
            num_classes=index.num_classes,
            seg_map_mode=options.seg_map_mode,
            text_encoder=options.text_encoder,
            bert_path=options.bert_path,
            vocab_size=tokenizer.vocab_size,
            word_dim=options.word_dim,
        )
        model = build_model(config)
    index.check_model_fits(config, checkpoint.extra.get("class_order") if resume else None, "the run's model")
    model.to(device)
    trained = model
    if world.distributed:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    groups = parameter_groups(model, options.lr, options.bert_lr_factor)
    optimizer = torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[options.lr_update], gamma=options.lr_decay)
    start_epoch, best_rsum, best_epoch = 0, -math.inf, -1
    if resume:
        extra = checkpoint.extra
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        start_epoch, best_rsum, best_epoch = extra["epoch"] + 1, extra["best_rsum"], extra["best_epoch"]
        restore_rng_states(extra["rng"])
        if start_epoch >= options.epochs:
            log(f"{run_dir} has finished its {options.epochs} epochs; pass a larger --epochs to train on")
        else:
            log(f"resuming {run_dir} at epoch {start_epoch} (best rSum {best_rsum:.2f} at epoch {best_epoch})")

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.options, {"options": options.to_dict(), "model": config.to_dict()})
    reader, val_reader = index.reader(train_set.images), index.reader(val_set.images)
    if options.in_memory:
        reader.load_in_memory()
        if world.is_main:
            val_reader.load_in_memory()
    pairs = TrainPairs(reader, train_set, tokenizer, options.seed, options.region_dropout)
    loader = train_loader(pairs, options.batch_size, options.workers, options.seed, device.type == "cuda", world.rank, world.size)
    loss_fn = HingeTripletLoss(options.margin)
    run_log = RunLog(run, keep_epochs=start_epoch) if world.is_main else None
    where = f"{world.size} processes ({device.type}, {options.batch_size // world.size} samples each)" if world.distributed else str(device)
    log(
        f"training the {options.level} model on {train_set.num_images} images / {len(train_set.captions)} captions, "
        f"validating on {val_set.num_images} images; {len(loader)} steps per epoch on {where}"
    )
    try:
        for epoch in range(start_epoch, options.epochs):
            started = time.perf_counter()
            hardest = epoch >= options.max_violation_after
            lr = optimizer.param_groups[0]["lr"]
            train_loss = train_one_epoch(trained, loader, optimizer, loss_fn, hardest, options, device, epoch)
            scheduler.step()
            if not world.is_main:
                continue
            val = validate(model, val_reader, val_set, tokenizer, options, device)
            is_best = val["rsum"] > best_rsum
            if is_best:
                best_rsum, best_epoch = val["rsum"], epoch
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "lr": lr,
                "hardest_negative": hardest,
                "val": val,
                "best_rsum": best_rsum,
                "seconds": round(time.perf_counter() - started, 3),
            }
            run_log.append(record)
            extra = {
                "epoch": epoch,
                "best_rsum": best_rsum,
                "best_epoch": best_epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_states(),
                "options": options.to_dict(),
                "metrics": record,
                "class_order": index.class_order,
            }
            save_checkpoint(last, model, config, tokenizer, extra)
            if is_best:
                atomic_copy(last, run.best)
            log(
                f"epoch {epoch}: loss {train_loss:.4f}, val rSum {val['rsum']:.2f} "
                f"(i2t R@1 {val['i2t']['r1']:.1f}, t2i R@1 {val['t2i']['r1']:.1f}){' best' if is_best else ''}, "
                f"{record['seconds']:.0f}s"
            )
    finally:
        if run_log is not None:
            run_log.close()
        reader.close()
        val_reader.close()
    return {"run_dir": str(run_dir), "best_rsum": best_rsum, "best_epoch": best_epoch, "epochs": options.epochs, "rank": world.rank}
