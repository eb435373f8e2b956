"""Small float64 models and a reference per-sample gradient loop for the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenModel(nn.Module):
    """Linear layers on ``(example, token, d)`` inputs, mean over tokens to logits."""

    def __init__(self, d: int = 6, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x))).mean(dim=1)


def mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(7, 6, bias=bias), nn.ReLU(), nn.Linear(6, 3, bias=bias))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


def make_case(kind: str, batch: int = 5, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """Return ``(model, inputs, labels)`` in float64 for one of the test model kinds."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, shape = {
        "mlp": (mlp, (7,)),
        "mlp_nobias": (lambda: mlp(bias=False), (7,)),
        "cnn": (cnn, (1, 6, 6)),
        "tokens": (TokenModel, (4, 6)),
    }[kind]
    net = model().double()
    inputs = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,), generator=gen)
    return net, inputs, labels


KINDS = ("mlp", "mlp_nobias", "cnn", "tokens")

loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy


def loop_grads(model: nn.Module, inputs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients by a plain ``torch.autograd.grad`` loop (the reference)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i : i + 1]), labels[i : i + 1])
        rows.append(torch.autograd.grad(loss, params))
    return {n: torch.stack([row[k] for row in rows]) for k, n in enumerate(names)}
