"""The 3SHNet image encoder: region (or grid-cell) features fused with segmentation, pooled by GPO.

Module and parameter names follow the reference implementation so that its checkpoints load by
name (``fc``, ``mlp``, ``crossmodalfusion_sm``, ``crossmodalfusion_sp``, ``gpool``, ...); see
``reference/3shnet-region-model.md`` for the operation-by-operation description.

Padding: regions at positions >= ``lengths`` never change an embedding. Their features are zeroed
on entry, every region-wise step is per region, and packing and pooling only read valid tokens.
The reference's MLPs run BatchNorm1d over all B*N token rows, so in train mode its batch statistics
include padded rows; here, in train mode, the region-wise BatchNorms compute their batch statistics
(and running-statistic updates) over valid rows only. In eval mode BatchNorm uses running
statistics token by token, which is exactly the reference's computation.

Segmentation inputs: ``seg_map`` [B,64,64] holds class ids as floats, fed raw (the void id 255
included, unchanged) or, with ``seg_map_mode="normalised"``, as ``(id/133 - 0.3342)/0.0621`` (an
earlier reference loader's normalisation; which one the released checkpoints expect is unknown).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.schema import CAT_ONEHOT, NUM_CLASSES, REGION_FEATURE_DIM, SEG_CELLS, SEG_FEAT, SEG_MAP, SEG_MAP_SIZE
from ..errors import ShnetError
from . import distributed
from .distributed import BatchAlignedDropout, batch_norm_rows
from .gpo import GPO, l2norm, length_mask, positional_encoding_1d
from .options import SEG_MAP_MODES

SPATIAL_DIM = 128
SPATIAL_ATTENTION_SCALE = 4.0  # the reference's lambda_softmax
_SEG_MAP_SCALE, _SEG_MAP_MEAN, _SEG_MAP_STD = float(NUM_CLASSES), 0.3342, 0.0621


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose train-mode statistics come from the rows marked valid only.

    Rows not marked valid come out as zeros in train mode; in eval mode (running statistics) every
    row is normalised on its own, as in plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if valid is None:
            return self._train_forward(x)
        normed = self._train_forward(x[valid])
        out = normed.new_zeros((x.shape[0], normed.shape[1]))
        out[valid] = normed
        return out

    def _train_forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Batch statistics of every rank's rows when training runs on several (see :mod:`.distributed`)."""
        return batch_norm_rows(self, rows) if distributed.active() else super().forward(rows)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics span every rank's batch when training runs on several."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.active()):
            return super().forward(x)
        rows = batch_norm_rows(self, x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
        return rows.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """Token-wise Linear -> BatchNorm1d -> ReLU -> Linear over [B, N, in_dim].

    ``bns.1`` (BatchNorm1d(out_dim)) exists, as in the reference module and in every reference
    checkpoint, but is never applied: the reference forward applies a BatchNorm after the non-final
    layers only, and applying it would change the embeddings of every trained checkpoint.
    ``valid`` [B, N] restricts the train-mode BatchNorm statistics to valid tokens.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden_dim), nn.Linear(hidden_dim, out_dim)])
        self.bns = nn.ModuleList([MaskedBatchNorm1d(hidden_dim), MaskedBatchNorm1d(out_dim)])

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        rows = valid.reshape(-1) if valid is not None else None
        x = x.reshape(batch * tokens, -1)
        x = F.relu(self.bns[0](self.layers[0](x), rows))
        return self.layers[1](x).view(batch, tokens, -1)


class SpatialTokens(nn.Module):
    """[B, C, H, W] class volume -> [B, H*W, C]: one token per spatial cell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def _class_embedding(num_classes: int, embed_size: int, *prefix: nn.Module) -> nn.Sequential:
    """``prefix`` -> Linear(C, D) -> ReLU -> Dropout(0.1) -> LayerNorm(D), the reference's embedding of
    class vectors; ``prefix`` (parameter-free reshaping) keeps the reference's module indices."""
    return nn.Sequential(
        *prefix, nn.Linear(num_classes, embed_size), nn.ReLU(), BatchAlignedDropout(p=0.1), nn.LayerNorm(embed_size)
    )


class SemanticHighlighting(nn.Module):
    """Regions gated by their affinity to the image's class-layout summary (``crossmodalfusion_sm``)."""

    def __init__(self, embed_size: int, num_classes: int):
        super().__init__()
        self.MLP_image = MLP(embed_size, embed_size // 2, embed_size)
        self.MLP_seg = MLP(embed_size, embed_size // 2, embed_size)
        self.embed_seg_HW = _class_embedding(num_classes, embed_size, nn.AvgPool2d(SEG_CELLS), nn.Flatten(1))
        self.fc_scale = nn.Linear(embed_size, embed_size)
        self.fc_1 = nn.Linear(embed_size, embed_size)

    def forward(self, regions: torch.Tensor, seg_feat: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        regions = self.MLP_image(regions, valid) + regions
        query = self.embed_seg_HW(seg_feat).unsqueeze(1)
        query = self.MLP_seg(query) + query
        affinity = torch.matmul(regions, query.transpose(1, 2)) / math.sqrt(regions.shape[-1])
        gate = torch.sigmoid(affinity.squeeze(-1).masked_fill(~valid, float("-inf")))
        gated = gate.unsqueeze(-1) * regions
        context = query * valid.unsqueeze(-1).to(query.dtype)
        return F.relu(self.fc_1(gated * torch.tanh(self.fc_scale(gated)) + context))


class SpatialHighlighting(nn.Module):
    """Regions attend over the pixels of the 64x64 class map (``crossmodalfusion_sp``).

    The attention keys are a 3x3 convolution of the class id (one channel) concatenated with an
    8-dim sinusoidal code of the flat pixel index; the code is a fixed buffer [8, 64, 64].
    """

    def __init__(self, embed_size: int):
        super().__init__()
        self.MLP_image = MLP(embed_size, embed_size // 2, SPATIAL_DIM)
        self.embedding_Seg = nn.Sequential(
            nn.Conv2d(9, SPATIAL_DIM, kernel_size=3, stride=1, padding=1), GlobalBatchNorm2d(SPATIAL_DIM), nn.ReLU()
        )
        self.embed_fusion = MLP(SPATIAL_DIM, embed_size // 2, embed_size)
        codes = positional_encoding_1d(8, SEG_MAP_SIZE * SEG_MAP_SIZE)
        self.register_buffer("pixel_codes", codes.t().reshape(8, SEG_MAP_SIZE, SEG_MAP_SIZE), persistent=False)

    def forward(self, regions: torch.Tensor, seg_map: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        queries = self.MLP_image(regions, valid)
        codes = self.pixel_codes.unsqueeze(0).expand(seg_map.shape[0], -1, -1, -1)
        keys = self.embedding_Seg(torch.cat([seg_map.unsqueeze(1), codes], dim=1)).flatten(2)
        attention = torch.matmul(queries, keys) / math.sqrt(SPATIAL_DIM)
        attention = torch.softmax(attention * SPATIAL_ATTENTION_SCALE, dim=-1)
        context = torch.matmul(attention, keys.transpose(1, 2))
        return self.embed_fusion(context * valid.unsqueeze(-1).to(context.dtype) + queries, valid)


def pack_tokens(
    category: torch.Tensor, regions: torch.Tensor, fused: torch.Tensor, seg_tokens: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Per sample, ``[category, regions[:L], fused[:L], seg_tokens]`` (2L + 1 + S tokens) padded to the
    batch maximum; positions beyond a sample's tokens hold arbitrary tokens (pooling ignores them)."""
    batch, num_regions, dim = regions.shape
    num_seg = seg_tokens.shape[1]
    source = torch.cat([category.unsqueeze(1), regions, fused, seg_tokens], dim=1)
    max_len = 2 * int(lengths.max()) + 1 + num_seg
    position = torch.arange(max_len, device=regions.device).unsqueeze(0)
    length = lengths.long().unsqueeze(1)
    index = torch.where(position <= length, position, position - length + num_regions)
    index = torch.where(position <= 2 * length, index, position - 2 * length + 2 * num_regions)
    index = index.clamp(max=source.shape[1] - 1)
    return torch.gather(source, 1, index.unsqueeze(-1).expand(batch, max_len, dim))


class ImageEncoder(nn.Module):
    """Regions [B, R, region_dim] (+ segmentation inputs) -> l2-normalised embeddings [B, D]."""

    def __init__(self, region_dim: int = REGION_FEATURE_DIM, embed_size: int = 1024, num_classes: int = NUM_CLASSES, seg_map_mode: str = "raw"):
        super().__init__()
        if seg_map_mode not in SEG_MAP_MODES:
            raise ShnetError(f"seg_map_mode must be one of {SEG_MAP_MODES}, got {seg_map_mode!r}")
        self.region_dim = region_dim
        self.num_classes = num_classes
        self.seg_map_mode = seg_map_mode
        self.embed_seg_C = _class_embedding(num_classes, embed_size, SpatialTokens())
        self.embed_category = _class_embedding(num_classes, embed_size)
        self.crossmodalfusion_sm = SemanticHighlighting(embed_size, num_classes)
        self.crossmodalfusion_sp = SpatialHighlighting(embed_size)
        self.fc = nn.Linear(region_dim, embed_size)
        self.mlp = MLP(region_dim, embed_size // 2, embed_size)
        self.seg_mlp = MLP(embed_size, embed_size // 2, embed_size)
        self.gpool = GPO(32, 32)
        self.fusion_mlp = MLP(embed_size, embed_size // 2, embed_size)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(
        self,
        regions: torch.Tensor,
        lengths: torch.Tensor,
        seg_map: torch.Tensor,
        cat_onehot: torch.Tensor,
        seg_feat: torch.Tensor,
    ) -> torch.Tensor:
        self._check_inputs(regions, lengths, seg_map, cat_onehot, seg_feat)
        regions, seg_map, cat_onehot, seg_feat = regions.float(), seg_map.float(), cat_onehot.float(), seg_feat.float()
        lengths = lengths.to(regions.device)
        valid = length_mask(lengths, regions.shape[1])
        regions = regions.masked_fill(~valid.unsqueeze(-1), 0)
        if self.seg_map_mode == "normalised":
            seg_map = (seg_map / _SEG_MAP_SCALE - _SEG_MAP_MEAN) / _SEG_MAP_STD

        projected = self.fc(regions)
        category = self.embed_category(cat_onehot)
        seg_tokens = self.embed_seg_C(seg_feat)
        semantic = self.crossmodalfusion_sm(projected, seg_feat, valid)
        spatial = self.crossmodalfusion_sp(projected, seg_map, valid)
        region_tokens = self.mlp(regions, valid) + projected
        seg_tokens = self.seg_mlp(seg_tokens) + seg_tokens
        fused = self.fusion_mlp(semantic + spatial + region_tokens, valid)

        tokens = pack_tokens(category, region_tokens, fused, seg_tokens, lengths)
        return l2norm(self.gpool(tokens, 2 * lengths.long() + 1 + seg_tokens.shape[1]))

    def _check_inputs(self, regions, lengths, seg_map, cat_onehot, seg_feat) -> None:
        batch, num_regions = regions.shape[:2]
        expected = {
            "regions": (regions, (batch, num_regions, self.region_dim)),
            "lengths": (lengths, (batch,)),
            SEG_MAP: (seg_map, (batch, SEG_MAP_SIZE, SEG_MAP_SIZE)),
            CAT_ONEHOT: (cat_onehot, (batch, self.num_classes)),
            SEG_FEAT: (seg_feat, (batch, self.num_classes, SEG_CELLS, SEG_CELLS)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ShnetError(
                    f"image input {name!r} has shape {tuple(tensor.shape)}, the model expects {shape} "
                    f"(region_dim={self.region_dim}, num_classes={self.num_classes})"
                )
        if bool(((lengths < 1) | (lengths > num_regions)).any()):
            raise ShnetError(f"image lengths must lie in 1..{num_regions} (the padded region count), got {lengths.tolist()}")
