"""Evaluation: encode a split once per image and once per caption, score every pair, report protocols.

An ensemble (e.g. the hybrid region + grid result) averages the similarity matrices of several
models; ``--sims`` files saved here or by other codebases (images x captions, each image's 5
captions consecutive: plain matrices, or the published code's ``{'npts', 'sims'}`` results, see
:mod:`shnet.trainer.similarity_files`) are averaged the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..cache.captions import CaptionSet, read_captions, select_split, stored_captions
from ..devices import resolve_device
from ..errors import ShnetError
from ..fileio import atomic_open
from .checkpoint import LoadedModel, load_model
from ..cache.features import FeatureIndex, FeatureReader
from .data import caption_loader, image_loader, match_split
from .metrics import CAPTIONS_PER_IMAGE, protocol_metrics
from .run import resolve_checkpoint
from .similarity_files import read_similarities, write_published

_SIMILARITY_ROWS = 1024  # image rows scored at once (bounds device memory)


@torch.no_grad()
def encode_split(
    model, reader: FeatureReader, captions: CaptionSet, tokenizer, batch_size: int, workers: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every image [N, D] and every caption [M, D] (in ``captions`` order), fp32 on ``device``."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    for batch in image_loader(reader, batch_size, workers, pin_memory=device.type == "cuda"):
        images.append(model.encode_images({k: v.to(device, non_blocking=True) for k, v in batch["images"].items()}).float())
    for batch in caption_loader(captions, tokenizer, batch_size):
        texts.append(model.encode_texts(batch["tokens"].to(device), batch["token_lengths"]).float())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def similarity_matrix(images: torch.Tensor, texts: torch.Tensor) -> np.ndarray:
    """Cosine similarities [N, M] (the embeddings are l2-normalised) as a float32 numpy array."""
    sims = np.empty((images.shape[0], texts.shape[0]), dtype=np.float32)
    for start in range(0, images.shape[0], _SIMILARITY_ROWS):
        block = images[start : start + _SIMILARITY_ROWS] @ texts.t()
        sims[start : start + block.shape[0]] = block.cpu().numpy()
    return sims


@dataclass
class EvalRequest:
    """What to evaluate on; without ``captions`` / ``caches``, each run's own training data is used."""

    captions: str | None = None
    caches: Sequence[str] = ()
    split: str = "test"
    protocol: str = "auto"
    bert_path: str | None = None
    batch_size: int = 128
    workers: int = 2
    device: str = "auto"


@dataclass
class Evaluation:
    sims: np.ndarray
    captions: CaptionSet
    results: dict[str, dict]


def _data_sources(loaded: LoadedModel, checkpoint: Path, request: EvalRequest) -> tuple[str, list[str]]:
    options = loaded.extra.get("options", {})
    caches = list(request.caches) or list(options.get("caches", []))
    captions = request.captions or (stored_captions(request.caches) if request.caches else None) or options.get("captions")
    if not captions or not caches:
        raise ShnetError(f"{checkpoint} does not name its data (a reference checkpoint?); pass --captions FILE and --cache CACHE_DIR")
    return captions, caches


def model_similarities(
    checkpoint: Path, request: EvalRequest, device: torch.device, log: Callable[[str], None]
) -> tuple[np.ndarray, CaptionSet]:
    """One model's similarity matrix on the requested split (every image must have features)."""
    loaded = load_model(checkpoint, bert_path=request.bert_path, map_location=device)
    if loaded.tokenizer is None:
        raise ShnetError(f"{checkpoint} carries no tokenizer (a reference checkpoint); pass --bert-path with its bert-base-uncased folder")
    captions_path, caches = _data_sources(loaded, checkpoint, request)
    config = loaded.config
    index = FeatureIndex(caches, config.level)
    index.check_model_fits(config, loaded.extra.get("class_order"), str(checkpoint))
    captions = match_split(select_split(read_captions(captions_path), request.split), index, "error", log)
    captions.require_captions_per_image(CAPTIONS_PER_IMAGE)
    reader = index.reader(captions.images)
    log(f"encoding {captions.num_images} images and {len(captions.captions)} captions of split '{request.split}' with {checkpoint}")
    images, texts = encode_split(loaded.model, reader, captions, loaded.tokenizer, request.batch_size, request.workers, device)
    reader.close()
    return similarity_matrix(images, texts), captions


def evaluate_checkpoints(paths: Sequence[str | Path], request: EvalRequest, log: Callable[[str], None] = print) -> Evaluation:
    """Evaluate one model, or the ensemble (mean similarity matrix) of several, on one split."""
    device = resolve_device(request.device)
    mean, reference = MeanMatrix(), None
    for path in paths:
        sims, captions = model_similarities(resolve_checkpoint(path), request, device, log)
        if reference is None:
            reference = captions
        elif captions.images != reference.images or captions.captions != reference.captions:
            raise ShnetError(
                f"{path} was evaluated on other images or captions than {paths[0]}; an ensemble needs one caption file and split"
            )
        mean.add(sims, str(path))
    sims = mean.value()
    return Evaluation(sims, reference, protocol_metrics(sims, request.protocol, reference.dataset))


class MeanMatrix:
    """The running mean of similarity matrices of one shape (float32, one matrix of extra memory)."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.count, self.first = 0, ""

    def add(self, sims: np.ndarray, name: str) -> None:
        if self.total is None:
            self.total, self.first = np.array(sims, dtype=np.float32), name
        elif sims.shape != self.total.shape:
            raise ShnetError(f"{name} has shape {sims.shape}, {self.first} has {self.total.shape}; ensembled matrices must match")
        else:
            self.total += sims
        self.count += 1

    def value(self) -> np.ndarray:
        return self.total / np.float32(self.count)


def load_similarities(paths: Sequence[str | Path]) -> np.ndarray:
    """The mean of saved similarity matrices (each images x captions, each image's captions
    consecutive), plain or published results files in any mix; their image counts must agree."""
    mean = MeanMatrix()
    first_npts: tuple[Path, int] | None = None  # the first file that states npts
    for path in paths:
        path = Path(path).expanduser()
        saved = read_similarities(path)
        if saved.npts is not None and first_npts is None:
            first_npts = (path, saved.npts)
        elif saved.npts is not None and saved.npts != first_npts[1]:
            raise ShnetError(f"{path} holds npts {saved.npts}, {first_npts[0]} npts {first_npts[1]}; ensembled results must be of one split")
        mean.add(saved.sims, str(path))
    return mean.value()


def save_similarities(path: str | Path, sims: np.ndarray, layout: str = "plain") -> Path:
    """``plain``: the float32 matrix; ``3shnet``: the published ``{'npts', 'sims'}`` results file,
    which the published ``eval_ensemble`` reads beside its own."""
    path = Path(path).expanduser()
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "3shnet":
        write_published(path, sims)
    else:
        with atomic_open(path) as handle:
            np.save(handle, sims.astype(np.float32))
    return path


def format_table(results: dict[str, dict], folds: bool = False) -> str:
    """A fixed-width table of the protocols (per-fold rows only with ``folds``)."""
    columns = ("R@1", "R@5", "R@10", "medr", "meanr")
    header = f"{'protocol':<16}" + "".join(f"{d + ' ' + c:>11}" for d in ("i2t", "t2i") for c in columns) + f"{'rSum':>9}"
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        if "/fold" in name and not folds:
            continue
        cells = [result[d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10", "medr", "meanr")]
        lines.append(f"{name:<16}" + "".join(f"{v:>11.1f}" for v in cells) + f"{result['rsum']:>9.1f}")
    return "\n".join(lines)


def results_json(results: dict[str, dict]) -> str:
    return json.dumps(results, indent=2)
