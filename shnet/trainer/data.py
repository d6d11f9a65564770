"""Cached features + captions -> torch datasets and loaders for training and evaluation.

The caches are read through :mod:`shnet.cache.features` (images joined on ``image_id`` across
caches, one image's model inputs from HDF5 or RAM); this module pairs them with captions.

Training samples are captions paired with their image (the VSE/3SHNet convention). Randomness
(shuffling, region dropout, caption masking) is drawn from generators seeded by (seed, epoch,
index), so a batch does not depend on worker count or timing and a resumed run replays exactly.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..cache.captions import CaptionSet, match_images
from ..cache.features import FeatureIndex, FeatureReader
from ..cache.schema import LAYOUT_INPUTS
from ..errors import ShnetError

REGION_DROPOUT = 0.2


def match_split(captions: CaptionSet, index: FeatureIndex, on_missing: str, warn: Callable[[str], None]) -> CaptionSet:
    """The split's images renamed to cache ids; images without usable features are dropped with a
    warning (``on_missing="drop"``) or refused (``"error"``)."""
    match = match_images(captions.images, index.image_ids)
    for name, image_id in match.cache_ids.items():
        reason = index.problem(image_id)
        if reason is not None:
            match.unusable[image_id] = reason
    keep = [i for i, name in enumerate(captions.images) if name in match.cache_ids and match.cache_ids[name] not in match.unusable]
    if match.num_missing:
        report = match.report(captions.split, captions.num_images)
        if on_missing == "error" or not keep:
            raise ShnetError(report)
        warn(report)
    return captions.subset(keep, rename=[match.cache_ids[captions.images[i]] for i in keep])


def drop_regions(tokens: np.ndarray, rng: np.random.Generator, rate: float = REGION_DROPOUT) -> np.ndarray:
    """Drop each region (grid cell) with probability ``rate``, keeping at least one."""
    if len(tokens) == 0:
        return tokens
    keep = rng.random(len(tokens)) >= rate
    if not keep.any():
        keep[rng.integers(len(tokens))] = True
    return tokens[keep]


class TrainPairs(Dataset):
    """(image, caption) pairs, one per caption; items are keyed by (epoch, caption index)."""

    def __init__(self, reader: FeatureReader, captions: CaptionSet, tokenizer, seed: int, region_dropout: float = REGION_DROPOUT):
        self.reader, self.captions, self.tokenizer = reader, captions, tokenizer
        self.seed, self.region_dropout = seed, region_dropout

    def __len__(self) -> int:
        return len(self.captions.captions)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, list[int], int]:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        image = self.reader.read(int(self.captions.caption_image[index]))
        image["tokens"] = drop_regions(image["tokens"], rng, self.region_dropout)
        tokens = self.tokenizer.augment(self.tokenizer.encode(self.captions.captions[index]), rng)
        return image, tokens, index


class ImageItems(Dataset):
    """Each image once (evaluation encodes an image once, not once per caption)."""

    def __init__(self, reader: FeatureReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[dict, int]:
        return self.reader.read(index), index


class CaptionItems(Dataset):
    """Each caption once, tokenised without augmentation."""

    def __init__(self, captions: CaptionSet, tokenizer):
        self.captions, self.tokenizer = captions, tokenizer

    def __len__(self) -> int:
        return len(self.captions.captions)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.tokenizer.encode(self.captions.captions[index]), index


class EpochBatchSampler(Sampler):
    """Shuffled batches of (epoch, index) keys; the order is a function of (seed, epoch) only.

    The last incomplete batch is dropped (BatchNorm needs more than one sample, and every step
    then sees a full batch of negatives), as in the reference training code. With ``ranks`` > 1,
    ``batch_size`` is the global batch and this rank gets its ``rank``-th equal slice of each.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, ranks: int = 1):
        if size < batch_size:
            raise ShnetError(f"the training split has {size} captions, fewer than one batch of {batch_size}; lower --batch-size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.share = rank, batch_size // ranks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * self.share
            yield [(self.epoch, int(i)) for i in order[start : start + self.share]]


def collate_images(images: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The model's image batch: ``regions`` [B,R,C] zero-padded, ``lengths`` [B] and the layout.

    Features stay fp16 and maps uint8, as cached: a quarter to a half of the bytes to collate and
    move to the GPU; the image encoder converts them to float32 on its device.
    """
    lengths = torch.tensor([len(image["tokens"]) for image in images], dtype=torch.long)
    width = images[0]["tokens"].shape[-1]
    regions = np.zeros((len(images), max(int(lengths.max()), 1), width), dtype=images[0]["tokens"].dtype)
    for i, image in enumerate(images):
        regions[i, : len(image["tokens"])] = image["tokens"]
    return {
        "regions": torch.from_numpy(regions),
        "lengths": lengths,
        **{name: torch.from_numpy(np.stack([image[name] for image in images])) for name in LAYOUT_INPUTS},
    }


def collate_tokens(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), max(int(lengths.max()), 1)), pad_id, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        tokens[i, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
    return tokens, lengths


class PairCollate:
    """Collates :class:`TrainPairs` items (a class, not a closure, so that workers can pickle it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items) -> dict:
        images, tokens, indices = zip(*items)
        token_ids, token_lengths = collate_tokens(tokens, self.pad_id)
        return {"images": collate_images(images), "tokens": token_ids, "token_lengths": token_lengths, "index": torch.tensor(indices)}


def collate_image_items(items) -> dict:
    images, indices = zip(*items)
    return {"images": collate_images(images), "index": torch.tensor(indices)}


class CaptionCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items) -> dict:
        tokens, indices = zip(*items)
        token_ids, token_lengths = collate_tokens(tokens, self.pad_id)
        return {"tokens": token_ids, "token_lengths": token_lengths, "index": torch.tensor(indices)}


def _own_generator() -> torch.Generator:
    """Loaders draw their worker seeds from this, not from the global torch RNG, so that the
    model's dropout sequence does not depend on how many loaders were iterated (or on resuming)."""
    return torch.Generator().manual_seed(0)


def train_loader(
    dataset: TrainPairs, batch_size: int, workers: int, seed: int, pin_memory: bool = False, rank: int = 0, ranks: int = 1
) -> DataLoader:
    """Batches of ``batch_size`` pairs, or this rank's share of them when ``ranks`` processes train."""
    return DataLoader(
        dataset,
        batch_sampler=EpochBatchSampler(len(dataset), batch_size, seed, rank, ranks),
        num_workers=workers,
        collate_fn=PairCollate(dataset.tokenizer.pad_id),
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=_own_generator(),
    )


def image_loader(reader: FeatureReader, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        ImageItems(reader),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_image_items,
        pin_memory=pin_memory,
        generator=_own_generator(),
    )


def caption_loader(captions: CaptionSet, tokenizer, batch_size: int) -> DataLoader:
    """Captions are tokenised in the main process: cheap next to encoding them."""
    return DataLoader(
        CaptionItems(captions, tokenizer), batch_size=batch_size, collate_fn=CaptionCollate(tokenizer.pad_id), generator=_own_generator()
    )
