"""The refusals of a probed step, made before any forward changes a buffer.

Every mode of the step (one model, a stack of models, data parallel) runs
these same checks. Whether a training loss is the mean of its examples' losses
is checked later, on the whole batch, by the probe's own outputs
(:func:`gradlens.probes.checks.check_mean_loss`), still before any step, and so
is the finiteness of every gradient of the step (:func:`check_all_finite`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gradlens.alignment.gradops import check_finite, non_finite_error
from gradlens.probes.batch import describe, examples
from gradlens.probes.checks import DeferredCheck
from gradlens.probes.deferred import active_ledger
from gradlens.probes.vmap import check_batch
from gradlens.training.objective import Objective
from gradlens.transforms.base import GradientTransform, needs_example_dots

__all__ = ["check_after", "check_all_finite", "check_objective", "check_optimizer"]

Grads = Mapping[str, Tensor]


def check_objective(which: str, objective: Objective, *, allow_empty: bool = False) -> None:
    """Raise for an objective whose targets do not match its inputs, or without examples.

    Args:
        which: How the message names it (``"train"``, ``"trait"``).
        objective: The objective.
        allow_empty: Accept a batch of no examples (a rank's empty shard).
    """
    check_batch(objective.inputs, objective.targets, what=f"{which}.inputs")
    if examples(objective.inputs) == 0 and not allow_empty:
        raise ValueError(
            f"{which}.inputs has no examples (shape {describe(objective.inputs)}); a probed "
            f"step needs at least one in each batch. Skip empty batches (for a DataLoader, "
            "drop_last=True)."
        )


def check_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> None:
    """Raise if ``optimizer`` would not update some of ``params`` (a step would be a no-op)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in held]
    if missing:
        shown = missing if len(missing) <= 4 else [*missing[:4], f"... {len(missing) - 4} more"]
        raise ValueError(
            f"the optimizer does not hold the model's parameters {shown}, so its step would "
            "leave them unchanged. Build it from this model's parameters, "
            "torch.optim.SGD(model.parameters(), ...), after any copy.deepcopy or .to(...) "
            "that replaces them; freeze parameters you do not train (requires_grad_(False))."
        )


def check_after(after: GradientTransform | None) -> None:
    """Refuse a per-example transform as ``after=`` (the update has no per-example parts)."""
    if after is not None and needs_example_dots(after):
        raise TypeError(
            "after= is a per-example transform (it needs example_dots), but after= transforms "
            "the optimizer's update, which has no per-example parts: per-example transforms "
            "describe gradients. Pass it as before= (on g, with the examples' dots), or use "
            "its global form (remove_aligned, scale_aligned) as after=."
        )


def check_all_finite(checked: Sequence[tuple[str, Grads]], *, step: int | None) -> None:
    """:func:`~gradlens.alignment.gradops.check_finite` of several gradients, one host read.

    All are read at once, before the optimizer steps; if any value is not
    finite, each gradient is checked in the order given, so the error is the
    one checking them one by one would raise: the first non-finite gradient,
    named, with its parameters and ``step``.

    Args:
        checked: ``(what, gradient)`` pairs, in the order a failure is reported;
            ``what`` names the gradient in the message.
        step: The training step, for the message.
    """
    ledger = active_ledger()
    filled = [v for _, grad in checked for v in grad.values() if v.numel() > 0]
    if filled:
        norms = torch._foreach_norm(filled, ord=math.inf)
        finite = torch.stack([n.float() for n in norms]).isfinite()
        if ledger is None:
            if not bool(finite.all()):  # the one read
                _raise_first(checked, step)
        else:  # held with the step's other checks; the gradients are not kept
            names = [(what, n) for what, grad in checked for n, v in grad.items() if v.numel()]
            ledger.add([DeferredCheck(~finite.all(), lambda: _raise_named(names, finite, step))])
    if ledger is not None:
        ledger.end_step(step)  # the step's last check


def _raise_first(checked: Sequence[tuple[str, Grads]], step: int | None) -> None:
    """Raise for the first non-finite gradient, in order, as one by one would."""
    for what, grad in checked:
        check_finite(grad, step=step, what=what)


def _raise_named(names: Sequence[tuple[str, str]], finite: Tensor, step: int | None) -> None:
    """:func:`check_finite`'s error for the first non-finite gradient, from per-tensor flags."""
    flags = finite.tolist()
    for what, _ in names:
        bad = tuple(n for (w, n), ok in zip(names, flags, strict=True) if w == what and not ok)
        if bad:
            raise non_finite_error(what, step, bad)
