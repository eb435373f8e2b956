"""Failures that only vmap has name their real cause and the fix.

Fused RNNs (once refused here) are exact by the loop path: tests/probes/test_rnn.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import per_example_grads
from gradlens.errors import UnsupportedModelError


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        if (x > 0).any():  # a branch on the data, as attention-mask code does
            return self.head(x)
        return self.head(-x)


def test_a_branch_on_the_data_is_named() -> None:
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match="branches on a tensor's value"):
        per_example_grads(Branching(), F.cross_entropy, x, y)
