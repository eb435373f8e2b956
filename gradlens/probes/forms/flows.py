"""Whether a parameter's flows establish the broadcast form, from two traces (private).

The plan (:mod:`gradlens.probes.plan`) asks this for a parameter that no
registered form covers; see :mod:`gradlens.probes.forms.broadcast` for the
form and for what must hold. The two traced forwards ran on the batch and on
its rows ``index`` (:func:`~gradlens.probes.forms.registry.establish_layout`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.probes.forms.base import Layout
from gradlens.probes.forms.broadcast import Flow, broadcast_shape
from gradlens.probes.forms.registry import establish_layout

__all__ = ["FlowPlan", "decide_flows"]


class FlowPlan(NamedTuple):
    """A parameter established on the broadcast path.

    Attributes:
        ops: The operations of its flows, in the order of the forward.
        consumers: ``(operation, layout of its x)`` of each consumer, in order.
        reason: In words.
    """

    ops: tuple[str, ...]
    consumers: tuple[tuple[str, Layout], ...]
    reason: str


def decide_flows(
    first: list[Flow],
    second: list[Flow],
    returned: bool,
    index: Tensor,
    batch: int,
    check_values: bool,
) -> FlowPlan | str:
    """The broadcast plan of one parameter, or why it has none.

    Args:
        first: Its flows in the trace of the batch.
        second: Its flows in the trace of rows ``index`` of the batch.
        returned: Whether the forward returns the parameter or a tensor computed from it.
        index: As for :func:`~gradlens.probes.forms.registry.establish_layout`.
        batch: Examples in the first trace.
        check_values: Whether the forward draws no random numbers.
    """
    if returned:
        return "the forward returns it, or a tensor computed from it"
    ops = tuple(f.op for f in first)
    if ops != tuple(f.op for f in second):
        return "the operations reading it differ between two traced forwards"
    consumers: list[tuple[str, Layout]] = []
    for a, b in zip(first, second, strict=True):
        if a.consumer is not None and b.consumer is not None:
            found = _consumer_layout(a, b, index, batch, check_values)
            if isinstance(found, str):
                return found
            consumers.append((a.op, found))
        elif a.consumer is None and b.consumer is None:
            if not _same_outputs(a.outputs, b.outputs):
                return (
                    f"read by {a.op}, whose output depends on the examples, and which has "
                    "no factored form"
                )
        else:
            return f"read by {a.op}, applied to the examples in one traced forward only"
    if not consumers:
        return "no operation applies it to the examples"
    steps = " -> ".join(dict.fromkeys(f.op for f in first if f.consumer is None)) or "itself"
    where = "; ".join(f"{op} on example axis {layout.axis}" for op, layout in consumers)
    reason = f"broadcast over the examples: {steps}, applied by {where}"
    return FlowPlan(ops, tuple(consumers), reason)


def _consumer_layout(
    a: Flow, b: Flow, index: Tensor, batch: int, check_values: bool
) -> Layout | str:
    """The layout of one consumer's ``x`` in both traces, with ``d`` broadcast along it."""
    ca, cb = a.consumer, b.consumer
    assert ca is not None and cb is not None
    if ca.modified() or cb.modified():
        return f"the input or output of its {a.op} is written in place later"
    layout = establish_layout(ca.other, cb.other, index, batch, check_values=check_values)
    if isinstance(layout, str):
        return layout
    shape = broadcast_shape(ca.operand, ca.other.ndim)
    if ca.operand.ndim > ca.other.ndim or shape[layout.axis] != 1:
        return (
            f"its {a.op} does not broadcast it along the example axis {layout.axis} of "
            f"{tuple(ca.other.shape)}"
        )
    return layout


def _same_outputs(first: list[Tensor], second: list[Tensor]) -> bool:
    """Whether an operation gave the same outputs in both traces (it does not see the examples)."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.numel() == 0:
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        scale = float(a.detach().abs().max().clamp_min(1e-30))
        tol = 50 * torch.finfo(a.dtype).eps * scale
        if float((a.detach() - b.detach()).abs().max()) > tol:
            return False
    return True
