"""Padding trimmed to the batch's longest example mixes examples: refused on every batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import per_example_dots, probe_batch
from gradlens.errors import UnsupportedModelError

TOKENS = 8


class Trimming(nn.Module):
    """Embeds tokens, trims the padding to the batch's longest example, mean-pools, classifies."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (example, 1 + token): length, then token ids
        lengths, ids = x[:, 0], x[:, 1:]
        longest = int(lengths.max())
        h = torch.tanh(self.embed(ids[:, :longest]))
        return self.head(h.mean(1))  # pools over the padded positions too: mixes examples


def batch(lengths: list[int]) -> Tensor:
    ids = torch.randint(1, 12, (len(lengths), TOKENS))
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    return torch.cat([torch.tensor(lengths)[:, None], ids], dim=1)


def test_a_longest_example_that_is_not_unique_is_still_seen() -> None:
    # Row 0 is a longest example but not the only one: dropping it (the plan's reversed
    # sub-batch) keeps the trimmed length, so only examples alone show the mix.
    model = Trimming().double()
    x, y = batch([8, 3, 8, 5]), torch.randint(0, 3, (4,))
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="padding trimmed"):
        per_example_dots(model, F.cross_entropy, x, y, reference=ref)


def test_a_cached_plan_does_not_accept_a_later_batch_that_mixes() -> None:
    model = Trimming().double()
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    y = torch.randint(0, 3, (4,))
    # Equal lengths: trimming changes nothing, the per-example values are exact, accepted.
    probe_batch(model, F.cross_entropy, batch([6, 6, 6, 6]), y, reference=ref)
    # The same input shape, so the cached plan applies; the batch mixes: refused all the same,
    # by the check of its first and last examples alone (the last is shorter than the longest).
    with pytest.raises(UnsupportedModelError, match="mixes examples"):
        probe_batch(model, F.cross_entropy, batch([6, 6, 6, 2]), y, reference=ref)
