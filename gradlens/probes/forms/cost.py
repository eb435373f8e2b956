"""The cost model of the plan: factored forms and a ``vmap`` pass, in multiply-adds (private).

``method="auto"`` takes one forward and backward (the *ghost pass*) for the
parameters with an established factored form, and a per-example ``vmap`` pass
for the others. A ``vmap`` pass costs a whole forward and backward whatever few
parameters it is for, so a plan with one small parameter on ``vmap`` can cost
more than ``vmap`` for all. The model, per batch of ``B`` examples:

- ``forward(p)``: multiply-adds of the forward's calls that read ``p`` (a
  linear or convolution: output entries times input features per output; an
  embedding, a normalisation or an elementwise call: output entries). Their
  sum ``F`` stands for the forward; a forward and backward costs ``3 F``.
  Calls that read no parameter (attention's score products) are not counted,
  so ``F`` is low for attention-heavy models, which favours the ghost pass.
- ``ghost(p)``: the factored form's work, one more pass over its calls,
  ``forward(p)``, plus ``B numel(p)`` where it builds per-example gradients
  (the normalisations and the broadcast form).
- ``vmap(p)``: ``KAPPA B numel(p)``: each per-example gradient entry is written,
  read for the dots and read for the norm, memory-bound work that costs about
  :data:`KAPPA` multiply-adds of a batched matmul each.

``auto`` with parameters ``V`` left on ``vmap`` is modelled as
``3 F + sum_ghost ghost(p) + 3 F + sum_V vmap(p)``, ``vmap`` for all as
``3 F + sum_all vmap(p)``; where the second is lower (and ``V`` is not empty),
:func:`gradlens.probes.plan.cheapest` sends every parameter to ``vmap``. Each plan entry carries its
:class:`Cost`, and an entry moved says both totals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from torch import Tensor

__all__ = ["KAPPA", "Cost", "call_flops", "entry_cost", "totals"]

KAPPA = 8.0
"""Multiply-adds one per-example gradient entry of a ``vmap`` pass is modelled to cost."""


class Cost(NamedTuple):
    """The modelled cost of one parameter's paths, in multiply-adds per batch.

    Attributes:
        forward: Of the forward's calls that read it (its share of a pass).
        ghost: Of its factored form (``inf`` without one).
        vmap: Of its per-example gradients in a ``vmap`` pass.
    """

    forward: float
    ghost: float
    vmap: float


def call_flops(output: Tensor, weight: Any) -> float:
    """Multiply-adds of one call: output entries times input features per output.

    Args:
        output: The call's output.
        weight: The parameter (or tensor computed from it) in its weight slot;
            a matrix or a convolution kernel has ``numel / rows`` inputs per output.
    """
    per_output = 1
    if isinstance(weight, Tensor) and weight.ndim >= 2 and weight.shape[0] > 0:
        per_output = weight.numel() // weight.shape[0]
    return float(output.numel() * per_output)


def entry_cost(forward: float, numel: int, batch: int, form: str | None) -> Cost:
    """The :class:`Cost` of one parameter on a plan's path.

    Args:
        forward: :func:`call_flops` summed over its calls.
        numel: Its number of entries.
        batch: Examples in the batch.
        form: Its factored form, ``None`` on ``vmap``.
    """
    builds = form is not None and ("norm" in form or form == "broadcast")
    ghost = math.inf if form is None else forward + (batch * numel if builds else 0.0)
    return Cost(forward, ghost, KAPPA * batch * numel)


def totals(costs: Iterable[tuple[Cost, bool]]) -> tuple[float, float]:
    """``(auto as planned, vmap for all)`` from each parameter's cost and whether it is on vmap."""
    found = list(costs)
    passes = 3.0 * sum(c.forward for c, _ in found)
    on_vmap = [c for c, v in found if v]
    auto = passes + sum(c.ghost for c, v in found if not v)
    if on_vmap:
        auto += passes + sum(c.vmap for c in on_vmap)
    return auto, passes + sum(c.vmap for c, _ in found)
