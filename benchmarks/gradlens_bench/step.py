"""The training steps the benchmark times: the MNIST student's, and a zoo model's.

The student step of the MNIST experiment is built here so the benchmark stands
alone: a student MLP 784-256-256-13 and a teacher with the same initialisation
plus 0.05 x noise; the training loss is the KL between the softmax of the
teacher's and the student's auxiliary logits 10..12 on a batch of noise images
uniform in ``[-1, 1]``; the trait loss is the cross-entropy of logits 0..9 on
a labelled probe batch of 1024 images; Adam with learning rate 3e-4.

A zoo model's step (:func:`make_zoo_step`) trains the model on a labelled
batch with its own loss, and takes the trait gradient of the same loss on a
separate batch of 64; SGD with learning rate 1e-2 and momentum 0.9. (Not
Adam: its first update is about ``lr * sign(g)``, so float32 rounding of
entries with ``|g|`` near its ``eps`` moves the update by up to 1e-3 relative
on GPT-2 and the agreement check would compare rounding, not methods.)

The DDP entry's steps (:func:`make_ddp_step`, every rank builds its own) train
on a batch of B examples per rank and take the trait gradient on a batch of
64, with SGD at learning rate 1e-3: ``ddp_mlp``, the MLP 784-256-256-10 with
the mean squared error to random targets on uniform images and the
cross-entropy of random labels as the trait loss; ``ddp_transformer``, the
tiny transformer distilled (:func:`gradlens_bench.nets.distill_loss`) from a
randomly initialised copy on random tokens, with the cross-entropy of the
trait token at the last position of 64 prompts as the trait loss. The model,
the teacher and the trait batch are the same on every rank; each rank draws
its own training batch.
:func:`probed` is the only place that calls :func:`gradlens.training.probed_step`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.compiling import Compile
from gradlens.training import Objective, StepResult, TraitCache, probed_step
from gradlens.training.losses import kl_divergence
from gradlens.transforms.base import GradientTransform
from gradlens_bench.nets import (
    TinyConfig,
    TinyTransformer,
    ddp_mlp,
    distill_loss,
    init_mlp,
    last_token_loss,
)

__all__ = [
    "SIZES",
    "StepWorkload",
    "distill",
    "make_ddp_step",
    "make_step_workload",
    "make_zoo_step",
    "pick",
    "probed",
    "trait",
    "unprobed_with_trait",
]

SIZES = (784, 256, 256, 13)


def pick(outputs: Any, output: str | None) -> Tensor:
    """What the loss sees: ``outputs`` itself, or its attribute ``output`` (``"logits"``).

    The benchmark's models are either tensor-valued or Hugging Face models, so
    this handles the one selector form they use, as a user's loop would.
    """
    return outputs if output is None else getattr(outputs, output)


PROBE_SIZE = 1024


def distill(outputs: Tensor, target_logits: Tensor) -> Tensor:
    """Training loss: KL from the teacher's to the student's auxiliary logits 10..12."""
    return kl_divergence(outputs[:, 10:], target_logits)


def trait(outputs: Tensor, labels: Tensor) -> Tensor:
    """Trait loss: cross-entropy of the class logits 0..9."""
    return F.cross_entropy(outputs[:, :10], labels)


@dataclass
class StepWorkload:
    """A model, its optimizer, a training batch ``noise`` and the trait (probe) batch.

    The training targets are the teacher's auxiliary logits on ``noise`` (the
    MNIST student's step) or, without a teacher, the fixed ``train_labels``.
    ``output`` is the gradlens output selector of the model, if it does not
    return a tensor.
    """

    student: nn.Module
    optimizer: torch.optim.Optimizer
    noise: Tensor
    probe: Tensor
    labels: Tensor
    teacher: nn.Module | None = None
    train_labels: Tensor | None = None
    train_loss: Callable[..., Tensor] = distill
    trait_loss: Callable[..., Tensor] = trait
    output: str | None = None

    def targets(self) -> Tensor:
        """The training targets: the teacher's auxiliary logits ``(example, 3)``, or the labels."""
        if self.teacher is None:
            assert self.train_labels is not None
            return self.train_labels
        with torch.no_grad():
            return self.teacher(self.noise)[:, 10:]

    def forward(self, inputs: Tensor) -> Tensor:
        """The tensor the losses see: ``student(inputs)``, or its attribute ``output``."""
        return pick(self.student(inputs), self.output)


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


def make_zoo_step(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    train: tuple[Tensor, Tensor],
    trait_batch: tuple[Tensor, Tensor],
    output: str | None,
) -> StepWorkload:
    """A zoo model's step: ``loss_fn`` on ``train`` trains, on ``trait_batch`` gives ``g_t``."""
    return StepWorkload(
        student=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
        noise=train[0],
        probe=trait_batch[0],
        labels=trait_batch[1],
        train_labels=train[1],
        train_loss=loss_fn,
        trait_loss=loss_fn,
        output=output,
    )


DDP_TRAIT = 64
"""Examples in the DDP entry's trait batch (every rank holds all of them)."""


def _ddp_data(name: str, batch: int, rank: int, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The DDP model and its batches; the draws of the first DDP benchmark, in its order."""
    torch.manual_seed(seed)
    if name == "ddp_mlp":
        model = ddp_mlp()
        gen = torch.Generator().manual_seed(seed + 1)
        probe = torch.rand(DDP_TRAIT, 784, generator=gen)
        labels = torch.randint(0, 10, (DDP_TRAIT,))  # the global generator, as it always was
        gen = torch.Generator().manual_seed(seed + 100 + rank)
        noise = torch.rand(batch, 784, generator=gen)
        found = {"train_labels": torch.randn(batch, 10, generator=gen)}
        found |= {"train_loss": F.mse_loss, "trait_loss": F.cross_entropy}
    elif name == "ddp_transformer":
        config = TinyConfig()
        model, teacher = TinyTransformer(config), TinyTransformer(config).requires_grad_(False)
        gen = torch.Generator().manual_seed(seed + 1)
        probe = torch.randint(0, config.vocab, (DDP_TRAIT, config.length), generator=gen)
        labels = torch.full((DDP_TRAIT,), config.trait_token)
        gen = torch.Generator().manual_seed(seed + 100 + rank)
        noise = torch.randint(0, config.vocab, (batch, config.length), generator=gen)
        with torch.no_grad():
            found = {"train_labels": teacher(noise)}
        found |= {"train_loss": distill_loss, "trait_loss": last_token_loss}
    else:
        raise ValueError(f"no DDP workload named {name!r}")
    return model, found | {"noise": noise, "probe": probe, "labels": labels}


def make_ddp_step(
    name: str, batch: int, device: torch.device, seed: int = 0, rank: int = 0
) -> StepWorkload:
    """A DDP model's state before its first step, with this rank's ``batch`` training examples.

    Args:
        name: ``"ddp_mlp"`` or ``"ddp_transformer"``.
        batch: Training examples of this rank.
        device: Where to put everything.
        seed: Seeds the model, the teacher and the trait batch (the same on every rank).
        rank: The process's rank, which draws its own training batch.
    """
    model, data = _ddp_data(name, batch, rank, seed)
    model = model.to(device)
    tensors = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in data.items()}
    return StepWorkload(
        student=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), **tensors
    )


def probed(
    w: StepWorkload,
    before: GradientTransform | None = None,
    before_state: Any = None,
    measure_change: bool = True,
    trait_cache: TraitCache | None = None,
    compile: bool | Compile = False,
) -> StepResult:
    """One step through :func:`gradlens.training.probed_step` (adapt here if its API moves).

    ``trait_cache`` reuses the trait gradient (:func:`gradlens.training.reuse_trait`);
    the caller keeps the result's ``trait_cache`` for the next call. ``compile``
    compiles gradlens's own arithmetic of the step (:mod:`gradlens.compiling`).
    """
    train = Objective(w.train_loss, w.noise, (w.targets(),))
    probe = Objective(w.trait_loss, w.probe, (w.labels,))
    return probed_step(
        w.student,
        w.optimizer,
        train,
        probe,
        before=before,
        before_state=before_state,
        measure_change=measure_change,
        output=w.output,
        trait_cache=trait_cache,
        compile=compile,
    )


def unprobed(w: StepWorkload) -> None:
    """The plain step a training loop takes: forward, backward of the training loss, Adam."""
    target = w.targets()
    w.optimizer.zero_grad(set_to_none=True)
    w.train_loss(w.forward(w.noise), target).backward()
    w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)


def unprobed_with_trait(w: StepWorkload) -> None:
    """The plain step plus the trait gradient at the current parameters, as a user would add it.

    The floor of what a probed step must do: one forward and backward of the
    trait loss on the probe batch (into fresh tensors, not ``.grad``), then
    :func:`unprobed`. Nothing else (no dots, no cosine, no records).
    """
    params = [p for p in w.student.parameters() if p.requires_grad]
    g_t = torch.autograd.grad(w.trait_loss(w.forward(w.probe), w.labels), params)
    unprobed(w)
    del g_t


def reference_update(w: StepWorkload, project: bool) -> dict[str, Tensor]:
    """The update one step should apply, from a copy of ``w``, computed by plain autograd.

    With ``project`` the training gradient first loses its component along the
    trait gradient (over all parameters at once), as ``remove_aligned()`` does.
    """
    w = copy.deepcopy(w)
    before = {n: p.detach().clone() for n, p in w.student.named_parameters()}
    params = {n: p for n, p in w.student.named_parameters() if p.requires_grad}  # not LoRA's base
    g_d = torch.autograd.grad(w.train_loss(w.forward(w.noise), w.targets()), list(params.values()))
    if project:
        g_t = torch.autograd.grad(w.trait_loss(w.forward(w.probe), w.labels), list(params.values()))
        # In float64: a float32 sum over millions of products (the ResNet) is off by 1e-4.
        c = sum((a.double() * b.double()).sum() for a, b in zip(g_d, g_t, strict=True)) / sum(
            b.double().square().sum() for b in g_t
        )
        g_d = tuple(a - c.to(a.dtype) * b for a, b in zip(g_d, g_t, strict=True))
    for p, g in zip(params.values(), g_d, strict=True):
        p.grad = g
    w.optimizer.step()
    return {n: p.detach() - before[n] for n, p in w.student.named_parameters()}
