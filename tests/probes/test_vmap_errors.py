"""Failures that only vmap has name their real cause and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import per_example_grads
from gradlens.errors import UnsupportedModelError


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        if (x > 0).any():  # a branch on the data, as attention-mask code does
            return self.head(x)
        return self.head(-x)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_a_fused_rnn_is_named_with_the_cell_level_fix(cell: type[nn.RNNBase]) -> None:
    model = Recurrent(cell).double()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match=rf"fused kernel of {cell.__name__}.*Cell"):
        per_example_grads(model, F.cross_entropy, x, y)


def test_a_branch_on_the_data_is_named() -> None:
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(UnsupportedModelError, match="branches on a tensor's value"):
        per_example_grads(Branching(), F.cross_entropy, x, y)
