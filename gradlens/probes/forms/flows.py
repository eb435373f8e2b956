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

from gradlens.probes.entry import PlanEntry
from gradlens.probes.forms.base import Layout, to_examples
from gradlens.probes.forms.broadcast import BROADCAST, Flow, broadcast_shape
from gradlens.probes.forms.registry import MAX_FLOW, OVERFLOW, OpLog, establish_layout

__all__ = ["FlowPlan", "by_root", "check_routes", "decide_flows", "flow_entry", "misrouted"]


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
    if any(f.op == OVERFLOW for f in first):
        return f"more than {MAX_FLOW} operations read it or tensors computed from it"
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
    if returned:
        return "the forward returns it, or a tensor computed from it"
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
    if ca.kind == "linear":
        if layout.axis > ca.other.ndim - 2:
            return f"the examples of the input of its {a.op} are on its feature axis"
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


def misrouted(output: Tensor, ends: dict[str, list[tuple[Tensor, Layout]]]) -> set[str]:
    """The parameters whose consumer outputs reach another example's output.

    For the first and the last example ``k``: the gradient of ``(output[k] * w).sum()``
    (``w`` random, fixed) with respect to each consumer output must be zero in
    the rows of every example but ``k``.

    Args:
        output: The tensor the loss sees, ``(example, ...)``, with its graph.
        ends: Name -> each consumer's output and its layout, from the same forward.

    Returns:
        The names with a consumer whose rows reach another example.
    """
    batch = output.shape[0]
    names = [n for n, found in ends.items() for _ in found]
    tensors = [(t, layout) for found in ends.values() for t, layout in found]
    if batch < 2 or not tensors or not output.requires_grad:
        return set() if batch < 2 or not tensors else set(ends)
    wrong: set[str] = set()
    gen = torch.Generator().manual_seed(0)
    for k in sorted({0, batch - 1}):
        w = torch.randn(output[k].shape, generator=gen, dtype=torch.float64)
        weighted = (output[k] * w.to(output.device, output.dtype)).sum()
        grads = torch.autograd.grad(
            weighted, [t for t, _ in tensors], retain_graph=True, allow_unused=True
        )
        for name, (t, layout), g in zip(names, tensors, grads, strict=True):
            if g is None:
                continue
            rows = to_examples(g, layout, t.shape[layout.axis] // layout.rows)
            rows = torch.cat([rows[:k], rows[k + 1 :]])
            if rows.numel() and bool(rows.ne(0).any()):
                wrong.add(name)
    return wrong


def flow_entry(
    flows: tuple[list[Flow], list[Flow]],
    returned: bool,
    index: Tensor,
    batch: int,
    check_values: bool,
) -> PlanEntry | str:
    """The broadcast entry of a parameter no registered form covers, or why it has none.

    Args:
        flows: Its flows in the two traces.
        returned: As for :func:`decide_flows`, and the rest.
        index: As for :func:`decide_flows`.
        batch: As for :func:`decide_flows`.
        check_values: As for :func:`decide_flows`.
    """
    found = decide_flows(*flows, returned, index, batch, check_values)
    if isinstance(found, str):
        return found
    layout = found.consumers[0][1]
    return PlanEntry(
        "ghost",
        found.reason,
        layout.axis,
        BROADCAST,
        layout.rows,
        layout.token_major,
        shared=found.consumers,
        flow=found.ops,
    )


def by_root(log: OpLog) -> dict[str, list[Flow]]:
    """The flows of each parameter, in the order of the forward."""
    found: dict[str, list[Flow]] = {}
    for f in log.flows:
        found.setdefault(f.root, []).append(f)
    return found


def check_routes(
    plan: dict[str, PlanEntry], flows: dict[str, list[Flow]], raw: Tensor | None
) -> None:
    """Send to ``vmap`` each broadcast parameter whose consumers reach other examples.

    Args:
        plan: The entries, changed in place.
        flows: Each parameter's flows in the trace of the batch (:func:`by_root`).
        raw: That trace's output the loss sees, with its graph.
    """
    ends = {
        name: [
            (f.consumer.output, layout)
            for f, (_, layout) in zip(
                [f for f in flows.get(name, []) if f.consumer is not None],
                entry.shared,
                strict=True,
            )
            if f.consumer is not None
        ]
        for name, entry in plan.items()
        if entry.path == "ghost" and entry.flow
    }
    if not ends or raw is None:
        return
    with torch.enable_grad():
        wrong = misrouted(raw, ends)
    for name in wrong:
        plan[name] = PlanEntry(
            "vmap",
            "broadcast over the examples, but the output of one of its consumers reaches "
            "another example's output (its rows are not each one example's)",
        )
