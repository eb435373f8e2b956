"""The one body of a probed step, shared by every mode and by the trainer integrations.

A probed step is one sequence, whatever runs it, in two halves around the
optimizer step:

1. :func:`before_optimizer`: ``g_t``, the trait gradient at the current
   parameters (and, when asked, the held-out trait gradient ``g_h`` and the
   gradient of another reference for the transforms to act along); ``g``, the
   training loss and the per-example dots and squared norms with ``g_t``, from
   one forward and backward (or a trainer's accumulated ``.grad``); the
   finiteness checks; ``before`` transforms ``g`` (reference ``g_t``, extra
   ``example_dots``); the records of ``g``. It returns a :class:`Pending`;
2. the optimizer steps on the gradient ``Pending.applied``;
3. :func:`after_optimizer`: ``after`` transforms the optimizer's update with reference
   ``-g_t`` (the direction in which a step lowers the trait loss); the update's
   records, the trait loss after the step, the :class:`StepResult`.

:func:`run_step` is the three in a row; :class:`~gradlens.integrations.TrainerProbe`
calls the halves around another trainer's step. A *mode*
(:class:`~gradlens.training.mode.StepMode`) supplies only where the gradients come
from (one model, a stack of models, a data-parallel shard) and how a statistic of one
model is taken over its models; the checks, the order, the transforms and every record
are here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradlens.errors import GradientMismatchError
from gradlens.probes.plan import PlanEntry
from gradlens.training.amortise import TraitCache, trait_gradient
from gradlens.training.checks import check_after, check_all_finite
from gradlens.training.mode import ModeProbe, StepMode, accumulate, examples_of, micro_batches
from gradlens.training.objective import Objective
from gradlens.training.record_values import gradient_records, pair, update_records
from gradlens.transforms.base import GradientTransform

__all__ = [
    "Pending",
    "StepResult",
    "after_optimizer",
    "before_optimizer",
    "run_step",
]

Grads = Mapping[str, Tensor]


class StepResult(NamedTuple):
    """What a probed step measured and the transforms' new states.

    Attributes:
        records: Named values: scalars, ``(layer,)`` per-layer values and
            ``(quantile,)`` quantiles of the per-example cosines, each with
            the mode's leading dims (``(model, ...)`` for a stack); their
            definitions (long names, units, dims) are
            :data:`gradlens.training.records.STEP_RECORDS` and
            :data:`~gradlens.training.records.OPTIONAL_RECORDS`.
        example_cosine: ``cos(g_i, g_t)`` of each training example, shape
            ``(*model, example)``.
        before_state: New state of the ``before`` transform (``None`` without one).
        after_state: New state of the ``after`` transform (``None`` without one).
        plan: The path (``"ghost"`` or ``"vmap"``) each parameter's per-example
            values took and why (:class:`~gradlens.probes.PlanEntry`); record it
            with :func:`~gradlens.training.records.plan_attr`.
        trait_cache: New state of the amortised trait gradient
            (:func:`~gradlens.training.reuse_trait`), ``None`` without one.
    """

    records: dict[str, Tensor]
    example_cosine: Tensor
    before_state: Any
    after_state: Any
    plan: dict[str, PlanEntry] = {}  # noqa: RUF012 - a NamedTuple default, never mutated
    trait_cache: TraitCache | None = None


class Pending(NamedTuple):
    """What :func:`before_optimizer` hands :func:`after_optimizer` across the optimizer step.

    Attributes:
        old: The parameters before the step (clones).
        g_t: The trait gradient.
        along: The gradient the transforms act along (``g_t``, or the reference's).
        g_h: The held-out trait gradient, or ``None``.
        applied: The gradient to hand the optimizer: ``g`` after ``before``.
        before_state: New state of the ``before`` transform.
        trait_loss: The trait loss where ``g_t`` was taken, ``(*model)``.
        records: The records of the gradients (everything before the update).
        example_cosine: ``cos(g_i, g_t)``, ``(*model, example)``.
        plan: The per-example values' plan.
        trait_cache: The amortised trait gradient's new state, or ``None``.
    """

    old: dict[str, Tensor]
    g_t: dict[str, Tensor]
    along: Grads
    g_h: Grads | None
    applied: Grads
    before_state: Any
    trait_loss: Tensor
    records: dict[str, Tensor]
    example_cosine: Tensor
    plan: dict[str, PlanEntry]
    trait_cache: TraitCache | None = None


def _first_moment(optimizer: torch.optim.Optimizer, params: Grads) -> dict[str, Tensor] | None:
    """The optimizer's first moment (Adam's ``exp_avg``, SGD's ``momentum_buffer``), if any."""
    moments = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        value = state.get("exp_avg", state.get("momentum_buffer"))
        if value is None:
            return None
        moments[name] = value
    return moments


def before_optimizer(
    mode: StepMode,
    train: Callable[[list[Grads]], ModeProbe],
    trait: Objective,
    *,
    before: GradientTransform | None,
    before_state: Any,
    step: int | None,
    heldout: Objective | None = None,
    reference: Objective | None = None,
    tokens: Callable[[Grads, Tensor], Tensor] | None = None,
    training: str = "training gradient",
    trait_cache: TraitCache | None = None,
    parts: Mapping[str, Objective] | None = None,
) -> Pending:
    """The first half of a probed step: the gradients, their checks, ``before`` and records.

    Args:
        mode: Where the gradients come from.
        train: ``train(references) -> ModeProbe``: the training batch's probe with
            the dots against each reference (``[g_t]``, then the transforms' own).
        trait: The trait objective.
        before: Transform of ``g`` before the optimizer.
        before_state: Its state.
        step: The step number, for error messages.
        heldout: A held-out trait objective, measured and never seen by a transform.
        reference: An objective whose gradient the transforms act along instead
            of ``g_t`` (a control); the records still measure against ``g_t``.
        tokens: Record ``token_dot``, ``tokens(g_t, train_loss)``.
        training: What the training gradient is called in a finiteness error.
        trait_cache: Take ``g_t`` every few steps and reuse it in between
            (:func:`~gradlens.training.reuse_trait`); records ``trait_age``.
        parts: Named objectives whose gradients (one backward each) are
            measured against ``g_t`` (``train_part_cosine``, ``train_part_norm``,
            dim ``part`` in this order): the parts of a combined training loss.

    Returns:
        The :class:`Pending` step; hand ``applied`` to the optimizer.
    """
    old = {n: p.detach().clone() for n, p in mode.params.items()}
    trait_loss, g_t, trait_cache = trait_gradient(mode, trait, trait_cache)
    checked = [("trait gradient", g_t)]
    along = g_t
    if reference is not None:
        _, along = mode.gradient(reference)
        checked.append(("transforms' reference gradient", along))
    g_h, heldout_loss = None, None
    if heldout is not None:
        heldout_loss, g_h = mode.gradient(heldout)
        checked.append(("held-out trait gradient", g_h))
    part_grads = {}
    for name, objective in (parts or {}).items():
        part_grads[name] = mode.gradient(objective)[1]
        checked.append((f"gradient of the training loss's part {name!r}", part_grads[name]))
    probe = train([g_t] if along is g_t else [g_t, along])
    g = probe.grad
    checked.append((training, g))
    check_all_finite(checked, step=step)
    token_dot = None if tokens is None else tokens(g_t, probe.loss)  # before the step

    applied = g
    if before is not None:
        try:
            applied, before_state = before.update(
                g,
                before_state,
                old,
                reference=along,
                example_dots=probe.dots[-1] if probe.dots else None,
            )
        except GradientMismatchError as err:
            if examples_of(probe) > 0:
                raise
            raise ValueError(
                "train has no examples, and a per-example transform in before needs at "
                f"least one: pass a train Objective with examples, or no such transform ({err})"
            ) from err

    records = {"trait_loss": trait_loss}
    found, example_cosine = gradient_records(
        mode.over_models,
        g,
        g_t,
        None if before is None else applied,
        probe.dots[0] if probe.sq_norms else {},
        probe.sq_norms,
    )
    if probe.sq_norms:  # per-example values
        records = {"train_loss": probe.loss, **records}
    records.update(found)
    if probe.parts:
        records["train_loss_part"] = torch.stack(list(probe.parts.values()), dim=-1)
    if part_grads:
        part_pairs = [pair(mode, grad, g_t) for grad in part_grads.values()]
        records["train_part_cosine"] = torch.stack([p.cosine for p in part_pairs], dim=-1)
        records["train_part_norm"] = torch.stack([p.sq.sum(-1).sqrt() for p in part_pairs], -1)
    if token_dot is not None:
        records["token_dot"] = token_dot
    if trait_cache is not None:
        records["trait_age"] = torch.full_like(trait_loss, trait_cache.age)
    if g_h is not None and heldout_loss is not None:
        records["heldout_trait_loss"] = heldout_loss
        records["heldout_cosine"] = pair(mode, g, g_h).cosine
    return Pending(
        old,
        g_t,
        along,
        g_h,
        applied,
        before_state,
        trait_loss,
        records,
        example_cosine,
        probe.plan,
        trait_cache,
    )


def after_optimizer(
    mode: StepMode,
    pending: Pending,
    *,
    after: GradientTransform | None,
    after_state: Any,
    trait: Objective | None,
    step: int | None,
    momentum: torch.optim.Optimizer | None = None,
) -> StepResult:
    """The second half of a probed step, after the optimizer stepped: the update's records.

    Args:
        mode: Where the gradients come from (as for :func:`before_optimizer`).
        pending: What :func:`before_optimizer` returned.
        after: Transform of the optimizer's update: the parameters become
            ``old + after(update)`` (a global transform, :func:`.check_after`).
        after_state: Its state.
        trait: The trait objective, to record ``measured_change``; ``None`` skips it.
            With a reused ``g_t`` (``trait_age`` > 0) the trait loss before the
            step is not known: ``measured_change`` is NaN and no forward is taken.
        step: The step number, for error messages.
        momentum: The optimizer whose first moment gives ``momentum_cosine``;
            ``None`` leaves it out.

    Returns:
        The :class:`StepResult`.
    """
    params, old, g_t = mode.params, pending.old, pending.g_t
    with torch.no_grad():
        delta = {n: p.detach() - old[n] for n, p in params.items()}
        if after is not None:
            # An update descends: its part that teaches the trait points along -reference.
            negative = {n: -r for n, r in pending.along.items()}
            delta, after_state = after.update(delta, after_state, old, reference=negative)
            for name, p in params.items():
                p.copy_(old[name] + delta[name])
    stale = pending.trait_cache is not None and pending.trait_cache.age > 0
    trait_after = mode.after_step(None if stale else trait, step)

    records = dict(pending.records)
    records.update(update_records(mode.over_models, delta, g_t))
    if trait_after is not None:
        records["measured_change"] = trait_after - pending.trait_loss
    elif trait is not None:  # g_t reused: the loss before the step was not taken
        records["measured_change"] = torch.full_like(pending.trait_loss, float("nan"))
    if momentum is not None:
        moment = _first_moment(momentum, params)
        records["momentum_cosine"] = (
            pair(mode, moment, g_t).cosine
            if moment is not None
            else torch.full_like(pending.trait_loss, float("nan"))
        )
    if pending.g_h is not None:
        records["heldout_update_cosine"] = pair(mode, delta, pending.g_h).cosine
    return StepResult(
        records,
        pending.example_cosine,
        pending.before_state,
        after_state,
        pending.plan,
        pending.trait_cache,
    )


def run_step(
    mode: StepMode,
    optimizer: torch.optim.Optimizer,
    train: Objective | Sequence[Objective],
    trait: Objective,
    *,
    before: GradientTransform | None,
    before_state: Any,
    after: GradientTransform | None,
    after_state: Any,
    step: int | None,
    measure_change: bool,
    heldout: Objective | None = None,
    reference: Objective | None = None,
    momentum: bool = False,
    tokens: Callable[[Grads, Tensor], Tensor] | None = None,
    trait_cache: TraitCache | None = None,
    part_gradients: bool = False,
) -> StepResult:
    """Take one probed optimizer step in ``mode``, its checks done by the caller.

    :func:`before_optimizer`, the optimizer's step on ``.grad``, :func:`after_optimizer`.

    Args:
        mode: Where the gradients come from.
        optimizer: Holds ``mode.params``; its ``.grad`` inputs are set and cleared here.
        train: The training objective, or its micro-batches (gradient accumulation:
            one optimizer step on all of their examples, see
            :func:`~gradlens.training.mode.accumulate`).
        trait: The trait objective.
        before: Transform of ``g`` before the optimizer.
        before_state: Its state.
        after: Transform of the optimizer's update.
        after_state: Its state.
        step: The step number, for error messages.
        measure_change: Also evaluate the trait loss after the step.
        heldout: A held-out trait objective, measured and never seen by a transform.
        reference: An objective whose gradient the transforms act along instead
            of ``g_t`` (a control); the records still measure against ``g_t``.
        momentum: Record the cosine of ``g_t`` with the optimizer's first moment.
        tokens: Record ``token_dot``, ``tokens(g_t, train_loss)`` before the
            optimizer steps (:func:`~gradlens.training.tokens.token_probe`).
        trait_cache: The amortised trait gradient's state (:func:`.reuse_trait`).
        part_gradients: Record ``train_part_cosine`` and ``train_part_norm``:
            ``g_t`` against the gradient of each of ``train.parts`` (one
            backward each; one ``train`` objective, not micro-batches).

    Returns:
        The :class:`StepResult`.

    Raises:
        ValueError: With ``part_gradients``, for a ``train`` without ``parts`` or
            given as micro-batches.
    """
    check_after(after)
    batches = micro_batches(train)
    parts = None
    if part_gradients:
        if len(batches) != 1 or not batches[0].parts:
            raise ValueError(
                "part_gradients=True measures the gradient of each of train.parts: pass one "
                "train Objective (not micro-batches) with parts={name: loss_fn, ...}, or "
                "part_gradients=False."
            )
        (one,) = batches
        parts = {name: Objective(fn, one.inputs, one.targets) for name, fn in one.parts.items()}
    pending = before_optimizer(
        mode,
        lambda references: accumulate([mode.probe(b, references) for b in batches]),
        trait,
        before=before,
        before_state=before_state,
        step=step,
        heldout=heldout,
        reference=reference,
        tokens=tokens,
        trait_cache=trait_cache,
        parts=parts,
    )
    for name, p in mode.params.items():
        p.grad = pending.applied[name].detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return after_optimizer(
        mode,
        pending,
        after=after,
        after_state=after_state,
        trait=trait if measure_change else None,
        step=step,
        momentum=optimizer if momentum else None,
    )
