"""The models and synthetic batches the probe benchmark runs on.

Every model is built from a fixed seed and maps its inputs to 13 logits, the
class count of the experiment. A :class:`Workload` bundles a model with one
batch, the loss and a reference gradient, so that every method is timed on
exactly the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn

from gradlens import mean_grad

__all__ = ["MODELS", "ModelSpec", "Workload", "make_workload", "n_params"]

CLASSES = 13


class MeanOverTokens(nn.Module):
    """Average ``(example, token, d)`` over ``token``: a module so libraries can see it."""

    def forward(self, x: Tensor) -> Tensor:
        """Shape ``(example, token, d)`` to ``(example, d)``."""
        return x.mean(dim=1)


def _mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in pairwise(widths):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, CLASSES),
    )


def _tokens(d: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, CLASSES), MeanOverTokens())


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and the shape of one example."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    example_shape: tuple[int, ...]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mlp",
            "experiment MLP 784-256-256-13",
            lambda: _mlp([784, 256, 256, CLASSES]),
            (1, 28, 28),
        ),
        ModelSpec(
            "wide_mlp",
            "MLP 784-4x1024-13",
            lambda: _mlp([784] + [1024] * 4 + [CLASSES]),
            (1, 28, 28),
        ),
        ModelSpec("cnn", "2 conv (16, 32) + linear on 1x28x28", _cnn, (1, 28, 28)),
        ModelSpec("tokens", "(B,16,128): Linear-ReLU-Linear, mean over T", _tokens, (16, 128)),
    )
}


def n_params(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Workload:
    """One model with one batch, on one device: what every method is given."""

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    inputs: Tensor
    targets: Tensor
    reference: dict[str, Tensor]


def make_workload(model_name: str, batch: int, device: torch.device, seed: int = 0) -> Workload:
    """Build the model, a random batch and a reference gradient, all from ``seed``.

    The reference is the mean gradient of a separate batch of 64 examples, as a
    probe would use a teacher's or a held-out batch's gradient.
    """
    spec = MODELS[model_name]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = spec.build().to(device)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, *spec.example_shape, generator=generator)
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        return x.to(device), y.to(device)

    ref_x, ref_y = draw(64)
    loss_fn = nn.functional.cross_entropy
    reference = mean_grad(model, loss_fn, ref_x, ref_y)
    inputs, targets = draw(batch)
    return Workload(model, loss_fn, inputs, targets, reference)
