"""Which regions a trained run's image embedding listens to: the GPO pooling weight each region carries.

GPO sorts every embedding dimension over the image's tokens and averages the sorted values with
weights that depend on the rank only. A token's share of the embedding is the weight of the rank it
takes, averaged over the dimensions; the shares of all tokens sum to 1. The 3SHNet token sequence
is ``[category, region_1..L, fused_1..L, segmentation cells]``, so region i carries the shares of
its two tokens, ``region_i`` and ``fused_i``; the category and segmentation tokens carry the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ShnetError
from ..trainer.checkpoint import load_model
from ..cache.features import FeatureIndex
from ..trainer.data import collate_images
from ..trainer.run import resolve_checkpoint


def token_shares(gpool, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """[length] share of the pooled vector each token carries (one sample: ``tokens`` [1, T, D])."""
    lengths = torch.tensor([length])
    weights = gpool.pool_weights(lengths)[0, :, 0]  # [T] weight per rank
    order = tokens[0, :length].sort(dim=0, descending=True).indices  # [T, D]: the token at each rank
    dims = order.shape[1]
    shares = torch.zeros(length, dtype=weights.dtype)
    shares.index_add_(0, order.reshape(-1), weights[:, None].expand(length, dims).reshape(-1))
    return shares / dims


@torch.no_grad()
def region_pooling_weights(run: str | Path, cache_root: str | Path, image_id: str, bert_path: str | None = None) -> np.ndarray:
    """[num_boxes] share of ``image_id``'s embedding carried by each of its regions, with the run's model."""
    checkpoint = resolve_checkpoint(run)
    loaded = load_model(checkpoint, bert_path=bert_path)
    if loaded.config.level != "region":
        raise ShnetError(f"{checkpoint} is a {loaded.config.level}-level model; --run shows pooling weights over regions of a region model")
    index = FeatureIndex([cache_root], "region")
    problem = index.problem(image_id)
    if problem is not None:
        raise ShnetError(f"{image_id} has no model input in {cache_root}: {problem}")
    if index.feature_dim != loaded.config.region_dim:
        raise ShnetError(f"{checkpoint} takes {loaded.config.region_dim}-d regions; {cache_root} holds {index.feature_dim}-d features")
    reader = index.reader([image_id])
    batch = collate_images([reader.read(0)])
    reader.close()
    captured = {}
    gpool = loaded.model.img_enc.gpool
    hook = gpool.register_forward_pre_hook(lambda module, args: captured.update(tokens=args[0], lengths=args[1]))
    try:
        loaded.model.encode_images(batch)
    finally:
        hook.remove()
    regions = int(batch["lengths"][0])
    shares = token_shares(gpool, captured["tokens"], int(captured["lengths"][0]))
    return (shares[1 : 1 + regions] + shares[1 + regions : 1 + 2 * regions]).numpy()
