"""Bidirectional hinge triplet loss over a batch of matching (image, caption) pairs (VSE++)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShnetError


class HingeTripletLoss(nn.Module):
    """Pair i of ``img`` [B, D] and ``txt`` [B, D] is the positive; every other row is a negative.

    Each positive is compared with the captions of its image's row (image -> text) and with the
    images of its caption's column (text -> image): ``max(0, margin + s(negative) - s(positive))``,
    summed over all negatives (``hardest=False``, the warm-up epoch) or taken for the hardest
    negative only (``hardest=True``); the result is summed over the batch, as in the reference.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, img: torch.Tensor, txt: torch.Tensor, hardest: bool) -> torch.Tensor:
        if img.shape != txt.shape or img.dim() != 2:
            raise ShnetError(f"the loss needs image and caption embeddings of one shape [B, D], got {tuple(img.shape)} and {tuple(txt.shape)}")
        with torch.autocast(device_type=img.device.type, enabled=False):  # margins need float32 scores
            scores = img.float() @ txt.float().t()
        positive = scores.diagonal()
        is_positive = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
        cost_caption = (self.margin + scores - positive[:, None]).clamp(min=0).masked_fill(is_positive, 0)
        cost_image = (self.margin + scores - positive[None, :]).clamp(min=0).masked_fill(is_positive, 0)
        if hardest:
            return cost_caption.max(dim=1)[0].sum() + cost_image.max(dim=0)[0].sum()
        return cost_caption.sum() + cost_image.sum()
