"""The workloads the benchmark runs on: models with one batch each.

Every model is built from a fixed seed and maps its inputs to 13 logits, the
class count of the experiment. Two families: ``"probe"`` models come with a
labelled batch, a cross-entropy loss and a reference gradient
(:class:`ProbeWorkload`); the ``"step"`` model is the experiment's student with
its teacher, optimizer and probe batch (:class:`benchmarks.step.StepWorkload`).
A method runs on the models of its own family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor, nn

from benchmarks.step import SIZES, StepWorkload, make_step_workload
from gradlens import mean_grad
from gradlens.mnist.models import init_mlp

__all__ = ["MODELS", "Family", "ModelSpec", "ProbeWorkload", "Workload", "make_workload"]

CLASSES = 13
Family = Literal["probe", "step"]


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
    """A benchmark model: its family, how to build it and the shape of one example."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    example_shape: tuple[int, ...]
    family: Family = "probe"


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
        ModelSpec(
            "mnist_step",
            "student step: MLP 784-256-256-13, KL on logits 10..12, Adam, 1024 probe images",
            lambda: init_mlp(SIZES, seed=0),
            (784,),
            family="step",
        ),
    )
}


@dataclass(frozen=True)
class ProbeWorkload:
    """One model with one batch, on one device: what every probe method is given."""

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    inputs: Tensor
    targets: Tensor
    reference: dict[str, Tensor]


Workload = ProbeWorkload | StepWorkload


def make_workload(model_name: str, batch: int, device: torch.device, seed: int = 0) -> Workload:
    """Build the model and its batch of ``batch`` examples, all from ``seed``.

    For probe models the reference is the mean gradient of a separate batch of
    64 examples, as a probe would use a teacher's or a held-out batch's gradient.
    """
    spec = MODELS[model_name]
    if spec.family == "step":
        return make_step_workload(batch, device, seed=seed)
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
    return ProbeWorkload(model, loss_fn, inputs, targets, reference)
