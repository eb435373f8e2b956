"""What a mode of the step body supplies: where a probed step's gradients come from.

A *mode* (:class:`StepMode`) is one model, a stack of models with a leading
``model`` dim, or a shard of a data-parallel batch. Its pass over the training
batch gives a :class:`ModeProbe`; the probes of a step's micro-batches are
made one by :func:`accumulate`. The step body (:mod:`gradlens.training.body`)
does everything else, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from gradlens.probes.plan import PlanEntry
from gradlens.training.objective import Objective

__all__ = ["ModeProbe", "StepMode", "accumulate", "examples_of", "micro_batches"]

T = TypeVar("T")
Grads = Mapping[str, Tensor]


class ModeProbe(NamedTuple):
    """What a mode's pass over the (global) training batch gives the body.

    Shapes carry the mode's leading dims ``(*model)``: none for one model,
    ``(model,)`` for a stack. A probe without per-example values (a trainer's
    accumulated ``.grad`` alone, :mod:`gradlens.integrations`) has empty
    ``dots`` and ``sq_norms``: the step then records no ``train_loss`` and no
    per-example summary, and its ``loss`` is not read.

    Attributes:
        loss: The batch loss, ``(*model)``.
        grad: The batch gradient ``g`` (mean over the global batch).
        dots: One dict per reference asked for: ``<g_i[p], r[p]>``, name ->
            ``(*model, example)``.
        sq_norms: ``||g_i[p]||^2``, name -> ``(*model, example)``.
        parts: The objective's named parts on the batch, name -> ``(*model)``.
        plan: The path each parameter's per-example values took, and why.
    """

    loss: Tensor
    grad: dict[str, Tensor]
    dots: list[dict[str, Tensor]]
    sq_norms: dict[str, Tensor]
    parts: dict[str, Tensor]
    plan: dict[str, PlanEntry] = {}  # noqa: RUF012 - a NamedTuple default, never mutated


class StepMode(Protocol):
    """Where a probed step's gradients come from; see the module docstring."""

    @property
    def params(self) -> dict[str, Tensor]:
        """The trained parameters, the ones the optimizer holds."""
        ...

    def over_models(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` of one model's tensors, taken over every model (identity, or ``vmap``)."""
        ...

    def gradient(self, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and gradient of a (trait) objective at the current parameters."""
        ...

    def probe(self, train: Objective, references: list[Grads]) -> ModeProbe:
        """The training batch's loss, gradient and per-example dots with each reference."""
        ...

    def after_step(self, trait: Objective | None, step: int | None) -> Tensor | None:
        """The trait loss at the new parameters (with ``trait``), and the mode's own checks."""
        ...


def micro_batches(train: Objective | Sequence[Objective]) -> list[Objective]:
    """The micro-batches of a step: one objective, or several accumulated into one step."""
    if isinstance(train, Objective):
        return [train]
    batches = list(train)
    if not batches or not all(isinstance(b, Objective) for b in batches):
        raise TypeError(
            "train must be an Objective or a non-empty sequence of Objectives (micro-batches "
            "accumulated into one optimizer step)."
        )
    return batches


def examples_of(probe: ModeProbe) -> int:
    """The number of examples the probe has values of (0 for a probe without them)."""
    return next(iter(probe.sq_norms.values())).shape[-1] if probe.sq_norms else 0


def accumulate(probes: list[ModeProbe]) -> ModeProbe:
    """One probe of the concatenated micro-batches, from each micro-batch's probe.

    The batch loss, gradient and parts are the example-weighted means (the
    mean over all examples, as for one batch of all of them: each micro-batch's
    loss is checked to be the mean of its examples' losses); the per-example
    dots and squared norms are concatenated along ``example``, in order.
    """
    if len(probes) == 1:
        return probes[0]
    counts = [examples_of(p) for p in probes]
    total = sum(counts)
    if total == 0:
        raise ValueError("every micro-batch of train is empty: give at least one example.")

    def mean(values: list[Tensor]) -> Tensor:
        return sum(v * (n / total) for v, n in zip(values, counts, strict=True))  # type: ignore[return-value]

    first = probes[0]
    return ModeProbe(
        mean([p.loss for p in probes]),
        {n: mean([p.grad[n] for p in probes]) for n in first.grad},
        [
            {n: torch.cat([p.dots[k][n] for p in probes], dim=-1) for n in first.dots[k]}
            for k in range(len(first.dots))
        ],
        {n: torch.cat([p.sq_norms[n] for p in probes], dim=-1) for n in first.sq_norms},
        {n: mean([p.parts[n] for p in probes]) for n in first.parts},
        first.plan,
    )
