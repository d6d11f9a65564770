"""Generalised pooling operator (GPO, from VSE-infinity) and the l2 normalisation that follows it.

GPO pools a variable-length set of feature vectors into one: every feature dimension is sorted in
descending order over the valid positions, and the sorted values are averaged with weights that
depend only on the rank and the set size. The weights come from a bidirectional GRU run over
sinusoidal codes of the ranks 0..n-1, so they are learned yet independent of the content.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_SCORE_OF_PADDING = -10000.0
_FEATURE_OF_PADDING = -10000.0
_TEMPERATURE = 0.1


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """``x / (||x|| + eps)``: the reference's normalisation (eps added to the norm, not under the root)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def positional_encoding_1d(dim: int, length: int) -> torch.Tensor:
    """Sinusoidal codes [length, dim] of positions 0..length-1: sin on even, cos on odd dimensions,
    frequencies 10000^(-2k/dim). Row t does not depend on ``length``."""
    if dim % 2:
        raise ValueError(f"sinusoidal codes need an even dimension, got {dim}")
    position = torch.arange(length, dtype=torch.float).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * -(math.log(10000.0) / dim))
    codes = torch.zeros(length, dim)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)
    return codes


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean [B, max_len]: True at positions below each sample's length."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths.long()[:, None]


class GPO(nn.Module):
    """Parameter names (``gru.*``, ``linear.weight``) match the reference checkpoints."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)
        self._code_table: torch.Tensor | None = None

    def _codes(self, length: int, device: torch.device) -> torch.Tensor:
        """The first ``length`` position codes, from a table cached on ``device`` that grows (doubling)
        when too short. Not a buffer: its size varies, and DDP requires buffers of equal shapes."""
        table = self._code_table
        size = 0 if table is None else table.shape[0]
        if size < length:
            size = max(length, 2 * size, 128)
        if table is None or table.shape[0] != size or table.device != device:
            self._code_table = table = positional_encoding_1d(self.d_pe, size).to(device)
        return table[:length]

    def pool_weights(self, lengths: torch.Tensor) -> torch.Tensor:
        """Softmax weights [B, T, 1] over ranks, T = max(lengths); exactly 0 beyond each length."""
        max_len = int(lengths.max())
        mask = length_mask(lengths, max_len).unsqueeze(-1)
        codes = self._codes(max_len, lengths.device).unsqueeze(0).expand(lengths.shape[0], -1, -1).masked_fill(~mask, 0)
        packed = pack_padded_sequence(codes, lengths.long().cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        half = out.shape[2] // 2
        out = (out[:, :, :half] + out[:, :, half:]) / 2
        scores = self.linear(out).masked_fill(~mask, _SCORE_OF_PADDING)
        return torch.softmax(scores / _TEMPERATURE, dim=1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pool ``features`` [B, T', D] (positions >= lengths[i] ignored) into [B, D]."""
        weights = self.pool_weights(lengths)
        max_len = weights.shape[1]
        mask = length_mask(lengths, max_len).unsqueeze(-1)
        ranked = features[:, :max_len].masked_fill(~mask, _FEATURE_OF_PADDING)
        ranked = ranked.sort(dim=1, descending=True)[0].masked_fill(~mask, 0)
        return (ranked * weights).sum(1)
