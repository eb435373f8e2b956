"""A parameter's entry in the plan, its modelled cost, and the plan ``auto`` follows (private).

See :mod:`gradlens.probes.plan` for how entries are established and
:mod:`gradlens.probes.forms.cost` for the cost model.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import Tensor

from gradlens.probes.forms.base import Call, Layout
from gradlens.probes.forms.cost import Cost, call_flops, entry_cost, totals
from gradlens.probes.forms.registry import OpLog

__all__ = ["PlanEntry", "cheapest", "with_costs"]


class PlanEntry(NamedTuple):
    """The path one parameter takes in ``per_example_dots`` and ``probe_batch``.

    Attributes:
        path: ``"ghost"`` (factored form) or ``"vmap"`` (per-example gradients).
        reason: Why, in words.
        example_axis: On the ghost path, the axis of the layer's input that
            holds the examples (0 for ``(example, ..., d_in)``); else ``None``.
        form: On the ghost path, the operation whose factored form is used
            (``"F.linear"``, ``"F.conv2d"``, ``"F.embedding"``, ...); else ``None``.
        rows: Rows of the example axis per example (``token`` when
            ``(example, token)`` is flattened into one axis, else 1).
        token_major: With ``rows > 1``, whether that axis is token-major.
        copy_output: Whether the layer's output is written in place later in
            the forward, so the ghost pass hands the forward a copy of it.
        shared: For a parameter read by several calls, ``(form, layout)`` of
            each call in the order of the forward (the fields above describe
            the first); empty when read once. On the broadcast path
            (``form == "broadcast"``), ``(operation, layout)`` of each consumer.
        flow: On the broadcast path, the operations reading the parameter or
            tensors computed from it, in order; else empty.
        cost: The modelled cost of its paths (:mod:`gradlens.probes.forms.cost`).
    """

    path: Literal["ghost", "vmap"]
    reason: str
    example_axis: int | None = None
    form: str | None = None
    rows: int = 1
    token_major: bool = False
    copy_output: bool = False
    shared: tuple[tuple[str, Layout], ...] = ()
    flow: tuple[str, ...] = ()
    cost: Cost | None = None

    @property
    def layout(self) -> Layout:
        """The :class:`~gradlens.probes.forms.base.Layout` of a ghost entry."""
        assert self.example_axis is not None
        return Layout(self.example_axis, self.rows, self.token_major)


def with_costs(
    plan: dict[str, PlanEntry], log: OpLog, selected: dict[str, Tensor], batch: int
) -> dict[str, PlanEntry]:
    """Each entry with its modelled :class:`~gradlens.probes.forms.cost.Cost`.

    Args:
        plan: The entries.
        log: The trace of the batch.
        selected: The planned parameters.
        batch: Examples in the batch.
    """
    forward = dict.fromkeys(plan, 0.0)
    for seen in log.seen:
        weight = seen.call.params.get("weight") if isinstance(seen.call, Call) else None
        for name in set(seen.read):
            forward[name] += call_flops(seen.output, weight)
    for f in log.flows:
        if f.consumer is not None and plan[f.root].flow:
            weight = f.consumer.operand if f.consumer.kind == "linear" else None
            forward[f.root] += call_flops(f.consumer.output, weight)
    return {
        name: entry._replace(
            cost=entry_cost(
                forward[name],
                selected[name].numel(),
                batch,
                entry.form if entry.path == "ghost" else None,
            )
        )
        for name, entry in plan.items()
    }


def cheapest(plan: dict[str, PlanEntry]) -> dict[str, PlanEntry]:
    """The plan ``method="auto"`` follows: this one, or ``vmap`` for all where that is cheaper.

    With no parameter on ``vmap``, the plan as it is; otherwise the modelled
    costs (:mod:`gradlens.probes.forms.cost`) of this plan and of ``vmap`` for
    every parameter are compared, and where the second is lower every entry
    goes to ``vmap`` with both totals in its reason.

    Args:
        plan: As from :func:`plan_for`.

    Returns:
        A fresh dict.
    """
    costs = [(e.cost, e.path == "vmap") for e in plan.values()]
    if not any(v for _, v in costs) or any(c is None for c, _ in costs):
        return dict(plan)
    auto, all_vmap = totals((c, v) for c, v in costs if c is not None)
    if all_vmap >= auto:
        return dict(plan)
    left = sum(v for _, v in costs)
    why = (
        f"by cost: vmap for every parameter, {all_vmap:.3g} multiply-adds modelled, is below "
        f"{auto:.3g} for the ghost pass plus a vmap pass for the {left} parameter(s) without "
        "a factored form"
    )
    return {
        n: e if e.path == "vmap" else PlanEntry("vmap", why, cost=e.cost) for n, e in plan.items()
    }
