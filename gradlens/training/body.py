"""The one body of a probed step, shared by every mode.

A probed step is one sequence, whatever runs it:

1. ``g_t``: the trait gradient at the current parameters (and, when asked,
   the held-out trait gradient ``g_h`` and the gradient of another reference
   for the transforms to act along);
2. ``g``, the training loss and the per-example dots and squared norms with
   ``g_t``, from one forward and backward;
3. ``before`` transforms ``g`` (reference ``g_t``, extra ``example_dots``);
   the optimizer steps; ``after`` transforms the optimizer's update with
   reference ``-g_t`` (the direction in which a step lowers the trait loss);
4. the records.

A *mode* (:class:`StepMode`) supplies only what differs: where the gradients
come from (one model; a stack of models with a leading ``model`` dim; a shard
of a data-parallel batch, with its collectives) and how a statistic of one
model is taken over its models (:meth:`StepMode.over_models`). The checks,
the order, the transforms and every record are here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from gradlens.alignment.gradops import check_finite, safe_divide
from gradlens.alignment.layerstats import layer_stats
from gradlens.alignment.measures import summarize
from gradlens.errors import GradientMismatchError
from gradlens.probes.plan import PlanEntry
from gradlens.training.objective import Objective
from gradlens.transforms.base import GradientTransform, needs_example_dots

__all__ = ["ModeProbe", "StepMode", "StepResult", "accumulate", "micro_batches", "run_step"]

T = TypeVar("T")
Grads = Mapping[str, Tensor]


class ModeProbe(NamedTuple):
    """What a mode's pass over the (global) training batch gives the body.

    Shapes carry the mode's leading dims ``(*model)``: none for one model,
    ``(model,)`` for a stack.

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
    """

    records: dict[str, Tensor]
    example_cosine: Tensor
    before_state: Any
    after_state: Any
    plan: dict[str, PlanEntry] = {}  # noqa: RUF012 - a NamedTuple default, never mutated


def _stats(grad: Grads, reference: Grads) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer ``<g, r>``, ``||g||^2`` and ``||r||^2`` of one model, each ``(layer,)``."""
    s = layer_stats(grad, reference=reference)
    return s.dot, s.sq_norm, s.ref_sq_norm


class _Pair(NamedTuple):
    """Per-layer statistics of a gradient against a reference, with the mode's lead dims."""

    dot: Tensor
    sq: Tensor
    ref_sq: Tensor

    @property
    def cosine(self) -> Tensor:
        return safe_divide(self.dot.sum(-1), (self.sq.sum(-1) * self.ref_sq.sum(-1)).sqrt())


def _pair(mode: StepMode, grad: Grads, reference: Grads) -> _Pair:
    return _Pair(*mode.over_models(_stats)(grad, reference))


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


def _sum_params(values: Mapping[str, Tensor]) -> Tensor:
    return torch.stack(list(values.values())).sum(dim=0)


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


def _examples(probe: ModeProbe) -> int:
    return next(iter(probe.sq_norms.values())).shape[-1]


def accumulate(probes: list[ModeProbe]) -> ModeProbe:
    """One probe of the concatenated micro-batches, from each micro-batch's probe.

    The batch loss, gradient and parts are the example-weighted means (the
    mean over all examples, as for one batch of all of them: each micro-batch's
    loss is checked to be the mean of its examples' losses); the per-example
    dots and squared norms are concatenated along ``example``, in order.
    """
    if len(probes) == 1:
        return probes[0]
    counts = [_examples(p) for p in probes]
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
) -> StepResult:
    """Take one probed optimizer step in ``mode``, its checks done by the caller.

    Args:
        mode: Where the gradients come from.
        optimizer: Holds ``mode.params``; its ``.grad`` inputs are set and cleared here.
        train: The training objective, or its micro-batches (gradient accumulation:
            one optimizer step on all of their examples, see :func:`accumulate`).
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

    Returns:
        The :class:`StepResult`.
    """
    if after is not None and needs_example_dots(after):
        raise TypeError(
            "after= is a per-example transform (it needs example_dots), but after= transforms "
            "the optimizer's update, which has no per-example parts: per-example transforms "
            "describe gradients. Pass it as before= (on g, with the examples' dots), or use "
            "its global form (remove_aligned, scale_aligned) as after=."
        )
    params = mode.params
    old = {n: p.detach().clone() for n, p in params.items()}
    trait_loss, g_t = mode.gradient(trait)
    check_finite(g_t, step=step, what="trait gradient")
    along = g_t
    if reference is not None:
        _, along = mode.gradient(reference)
        check_finite(along, step=step, what="transforms' reference gradient")
    if heldout is not None:
        heldout_loss, g_h = mode.gradient(heldout)
        check_finite(g_h, step=step, what="held-out trait gradient")
    references = [g_t] if along is g_t else [g_t, along]
    probe = accumulate([mode.probe(batch, references) for batch in micro_batches(train)])
    g = probe.grad
    check_finite(g, step=step, what="training gradient")

    applied = g
    if before is not None:
        try:
            applied, before_state = before.update(
                g, before_state, old, reference=along, example_dots=probe.dots[-1]
            )
        except GradientMismatchError as err:
            if next(iter(probe.sq_norms.values())).shape[-1] > 0:
                raise
            raise ValueError(
                "train has no examples, and a per-example transform in before needs at "
                f"least one: pass a train Objective with examples, or no such transform ({err})"
            ) from err
    for name, p in params.items():
        p.grad = applied[name].detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        delta = {n: p.detach() - old[n] for n, p in params.items()}
        if after is not None:
            # An update descends: its part that teaches the trait points along -reference.
            negative = {n: -r for n, r in along.items()}
            delta, after_state = after.update(delta, after_state, old, reference=negative)
            for name, p in params.items():
                p.copy_(old[name] + delta[name])
    trait_after = mode.after_step(trait if measure_change else None, step)

    train_pair = _pair(mode, g, g_t)
    update_pair = _pair(mode, delta, g_t)
    trait_norm = train_pair.ref_sq.sum(-1).sqrt()
    g_dot_t = train_pair.dot.sum(-1)
    example_dot = _sum_params(probe.dots[0])
    example_cosine = safe_divide(
        example_dot, _sum_params(probe.sq_norms).sqrt() * trait_norm[..., None]
    )
    summary = summarize(example_cosine)
    records = {
        "train_loss": probe.loss,
        "trait_loss": trait_loss,
        "cosine": train_pair.cosine,
        "trait_norm": trait_norm,
        "train_norm": train_pair.sq.sum(-1).sqrt(),
        "projection": safe_divide(g_dot_t, trait_norm.square()),
        "layer_cosine": safe_divide(train_pair.dot, (train_pair.sq * train_pair.ref_sq).sqrt()),
        "layer_trait_norm": train_pair.ref_sq.sqrt(),
        "layer_train_norm": train_pair.sq.sqrt(),
        "applied_cosine": train_pair.cosine if before is None else _pair(mode, applied, g_t).cosine,
        "update_cosine": update_pair.cosine,
        "predicted_change": update_pair.dot.sum(-1),
        "layer_predicted_change": update_pair.dot,
        "example_cosine_mean": summary["mean"],
        "example_cosine_quantile": summary["quantile"],
        "example_cosine_frac_positive": summary["frac_positive"],
    }
    if trait_after is not None:
        records["measured_change"] = trait_after - trait_loss
    if probe.parts:
        records["train_loss_part"] = torch.stack(list(probe.parts.values()), dim=-1)
    if momentum:
        moment = _first_moment(optimizer, params)
        records["momentum_cosine"] = (
            _pair(mode, moment, g_t).cosine
            if moment is not None
            else torch.full_like(trait_norm, float("nan"))
        )
    if heldout is not None:
        records["heldout_trait_loss"] = heldout_loss
        records["heldout_cosine"] = _pair(mode, g, g_h).cosine
        records["heldout_update_cosine"] = _pair(mode, delta, g_h).cosine
    return StepResult(records, example_cosine, before_state, after_state, probe.plan)
