"""The student step of the MNIST experiment, built here so the benchmark stands alone.

A student MLP 784-256-256-13 and a teacher with the same initialisation plus
0.05 x noise; the training loss is the KL between the softmax of the teacher's
and the student's auxiliary logits 10..12 on a batch of noise images uniform
in ``[-1, 1]``; the trait loss is the cross-entropy of logits 0..9 on a
labelled probe batch of 1024 images; Adam with learning rate 3e-4.
:func:`probed` is the only place that calls :func:`gradlens.training.probed_step`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.losses import kl_divergence
from gradlens.mnist.models import init_mlp
from gradlens.training import Objective, StepResult, probed_step
from gradlens.transforms.base import GradientTransform

__all__ = ["SIZES", "StepWorkload", "distill", "make_step_workload", "probed", "trait"]

SIZES = (784, 256, 256, 13)
PROBE_SIZE = 1024


def distill(outputs: Tensor, target_logits: Tensor) -> Tensor:
    """Training loss: KL from the teacher's to the student's auxiliary logits 10..12."""
    return kl_divergence(outputs[:, 10:], target_logits)


def trait(outputs: Tensor, labels: Tensor) -> Tensor:
    """Trait loss: cross-entropy of the class logits 0..9."""
    return F.cross_entropy(outputs[:, :10], labels)


@dataclass
class StepWorkload:
    """Student, teacher, optimizer, one noise batch ``(example, pixel)`` and the probe batch."""

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    noise: Tensor
    probe: Tensor
    labels: Tensor

    def targets(self) -> Tensor:
        """The teacher's auxiliary logits on the noise batch, shape ``(example, 3)``."""
        with torch.no_grad():
            return self.teacher(self.noise)[:, 10:]


def make_step_workload(batch: int, device: torch.device, seed: int = 0) -> StepWorkload:
    """The student's state before its first step, with ``batch`` noise images."""
    gen = torch.Generator().manual_seed(seed + 1)
    teacher = init_mlp(SIZES, seed=seed).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    student = init_mlp(SIZES, seed=seed).to(device)
    return StepWorkload(
        student=student,
        teacher=teacher.to(device),
        optimizer=torch.optim.Adam(student.parameters(), lr=3e-4),
        noise=(torch.rand(batch, SIZES[0], generator=gen) * 2 - 1).to(device),
        probe=(torch.rand(PROBE_SIZE, SIZES[0], generator=gen) * 2 - 1).to(device),
        labels=torch.randint(0, 10, (PROBE_SIZE,), generator=gen).to(device),
    )


def probed(
    w: StepWorkload,
    before: GradientTransform | None = None,
    before_state: Any = None,
    measure_change: bool = True,
) -> StepResult:
    """One step through :func:`gradlens.training.probed_step` (adapt here if its API moves)."""
    train = Objective(distill, w.noise, (w.targets(),))
    probe = Objective(trait, w.probe, (w.labels,))
    return probed_step(
        w.student,
        w.optimizer,
        train,
        probe,
        before=before,
        before_state=before_state,
        measure_change=measure_change,
    )


def unprobed(w: StepWorkload) -> None:
    """The plain step a distillation loop takes: forward, backward of the KL, Adam."""
    target = w.targets()
    w.optimizer.zero_grad(set_to_none=True)
    distill(w.student(w.noise), target).backward()
    w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)


def reference_update(w: StepWorkload, project: bool) -> dict[str, Tensor]:
    """The update one step should apply, from a copy of ``w``, computed by plain autograd.

    With ``project`` the training gradient first loses its component along the
    trait gradient (over all parameters at once), as ``remove_aligned()`` does.
    """
    w = copy.deepcopy(w)
    params = dict(w.student.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    g_d = torch.autograd.grad(distill(w.student(w.noise), w.targets()), list(params.values()))
    if project:
        g_t = torch.autograd.grad(trait(w.student(w.probe), w.labels), list(params.values()))
        c = sum((a * b).sum() for a, b in zip(g_d, g_t, strict=True)) / sum(
            b.square().sum() for b in g_t
        )
        g_d = tuple(a - c * b for a, b in zip(g_d, g_t, strict=True))
    for p, g in zip(params.values(), g_d, strict=True):
        p.grad = g
    w.optimizer.step()
    return {n: p.detach() - before[n] for n, p in params.items()}
