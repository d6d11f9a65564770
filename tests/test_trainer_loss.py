"""The hinge triplet loss against a brute-force double loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shnet.errors import ShnetError
from shnet.trainer.loss import HingeTripletLoss


def brute_force(img: torch.Tensor, txt: torch.Tensor, margin: float, hardest: bool) -> float:
    n = img.shape[0]
    s = [[float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):  # image i as the anchor: its caption against the other captions
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i]
        total += max(costs) if hardest else sum(costs)
    for j in range(n):  # caption j as the anchor: its image against the other images
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(n) if i != j]
        total += max(costs) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_loss_equals_brute_force(hardest, margin):
    gen = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(7, 16, generator=gen), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(7, 16, generator=gen), dim=1)
    loss = HingeTripletLoss(margin)(img, txt, hardest=hardest)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(brute_force(img, txt, margin, hardest), rel=1e-5)


def test_loss_is_zero_for_well_separated_pairs_and_has_gradients():
    img = torch.eye(4, requires_grad=True)
    txt = torch.eye(4)
    loss_fn = HingeTripletLoss(0.2)
    assert loss_fn(img, txt, hardest=False).item() == 0.0
    shuffled = txt[[1, 0, 2, 3]]
    loss = loss_fn(img, shuffled, hardest=True)
    assert loss.item() == pytest.approx(brute_force(img.detach(), shuffled, 0.2, True))
    loss.backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_hardest_negative_never_exceeds_the_sum():
    gen = torch.Generator().manual_seed(4)
    img, txt = F.normalize(torch.randn(2, 6, 8, generator=gen), dim=2)
    loss_fn = HingeTripletLoss()
    assert loss_fn(img, txt, hardest=True) <= loss_fn(img, txt, hardest=False)


def test_loss_rejects_unpaired_batches():
    with pytest.raises(ShnetError, match="one shape"):
        HingeTripletLoss()(torch.zeros(3, 4), torch.zeros(2, 4), hardest=False)
