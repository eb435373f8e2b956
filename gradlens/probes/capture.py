"""The ghost pass: one forward and backward, factored forms for planned parameters (private).

Runs the forward under an :class:`~gradlens.probes.forms.registry.OpLog` that captures each
registered call reading a ghost parameter (see :mod:`gradlens.probes.plan` for
how the plan was established), backpropagates the summed per-example losses to
the captured outputs (and to the parameters for the batch gradient), and hands
each call's input and output gradient to its form. Parameters read by several
calls are combined by :mod:`gradlens.probes.forms.shared`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gradlens.compiling import compiled
from gradlens.probes.batch import call, examples
from gradlens.probes.checks import mean_loss_check, settle
from gradlens.probes.forms.base import Layout
from gradlens.probes.forms.broadcast import Consumer, flow_results, replay
from gradlens.probes.forms.registry import OpLog, Seen, tensors_in
from gradlens.probes.forms.shared import Part, combine
from gradlens.probes.outputs import OutputSelector, select_output
from gradlens.probes.plan import PlanEntry, rows_alone_check
from gradlens.probes.precision import upcast, upcast_call
from gradlens.probes.vmap import LossFn, per_example_losses

__all__ = ["ghost_pass"]


def ghost_pass(
    model: nn.Module,
    loss_fn: LossFn,
    references: Mapping[str, Tensor],
    inputs: Tensor,
    targets: tuple[Tensor, ...],
    selected: dict[str, Tensor],
    frozen: dict[str, Tensor],
    plan: Mapping[str, PlanEntry],
    *,
    output: OutputSelector | None,
    with_grad: bool,
    check_rows: bool = True,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One forward and one backward; ghost values for the parameters planned so.

    Each registered call reading a ghost parameter is captured by an
    :class:`~gradlens.probes.forms.registry.OpLog`; its example layout comes from ``plan``.
    A parameter whose capture does not match its plan (read again, another
    form or shape) gets no ghost value, so the caller sends it to ``vmap``.

    ``references`` holds stacked references, name -> ``(reference, *param)``;
    the other arguments are those of :func:`gradlens.probes.ghost.probe_batch`, with the
    parameters split by ``split_params``; ``check_rows`` runs
    :func:`~gradlens.probes.plan.check_rows_alone` on this batch (two forwards of
    one example), off only where the forward draws random numbers; it and the
    mean-loss check share one host read (:func:`~gradlens.probes.checks.settle`).

    Returns:
        ``(losses, grad_sum, dots, sq_norms)``: per-example losses ``(example,)``;
        with ``with_grad`` the sum over examples of the per-example gradients of
        every selected parameter (else empty); dots ``(example, reference)`` and
        squared norms ``(example,)`` of the ghost parameters.
    """
    batch = examples(inputs)
    params = {n: p.requires_grad_() for n, p in selected.items()}
    buffers = dict(model.named_buffers())
    ghost = {id(params[n]): n for n, e in plan.items() if e.path == "ghost" and not e.flow}
    flows = {id(params[n]): n for n, e in plan.items() if e.path == "ghost" and e.flow}
    copies = {n for n, e in plan.items() if e.copy_output}
    log = OpLog(ghost, copy_outputs=copies, flows=flows)
    with torch.enable_grad(), log:
        outputs = call(model, (params, frozen, buffers), inputs)
        losses = per_example_losses(loss_fn, outputs, *targets, output=output)
    checks = []  # settled with one host read
    if with_grad:  # the batch gradient is the mean of the examples' only for a mean loss
        with torch.no_grad():
            batch_loss = loss_fn(select_output(outputs, output), *targets)
            checks.append(mean_loss_check(batch_loss, losses))
    if check_rows:  # every batch, cached plan or not: a data-dependent mix shows here
        detached = {n: p.detach() for n, p in params.items()}
        seen = select_output(outputs, output)
        checks.append(rows_alone_check(model, detached, frozen, inputs, seen, output))
    settle(checks)
    eligible = _as_planned(log, plan, batch)
    consumers = flow_consumers(log, plan, batch)
    ends = [c.output for found in consumers.values() for c, _ in found]
    wrt = [seen.output for seen, _ in eligible] + ends
    wrt += list(params.values()) if with_grad else []
    if not wrt:
        return losses.detach(), {}, {}, {}
    # A flow's vector-Jacobian product runs through its example-free operations (wpe's
    # embedding, in_proj's split): they run again from the parameter, with a graph of their
    # own; where they cannot, the forward's graph is kept (its saved tensors live to the end).
    replayed = {
        name: replay(params[name], [f for f in log.flows if f.root == name], tensors_in)
        for name, found in consumers.items()
        if any(c.operand is not params[name] for c, _ in found)
    }
    keep = any(r is None for r in replayed.values())
    with torch.enable_grad():
        found = torch.autograd.grad(losses.sum(), wrt, allow_unused=True, retain_graph=keep)
    output_grads, found = found[: len(eligible)], found[len(eligible) :]
    end_grads, param_grads = found[: len(ends)], found[len(ends) :]
    grad_sum = (
        {
            n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(params.items(), param_grads, strict=True)
        }
        if with_grad
        else {}
    )
    dots: dict[str, Tensor] = {}
    sq_norms: dict[str, Tensor] = {}
    parts: dict[str, list[Part]] = {}
    for (seen, layout), b in zip(eligible, output_grads, strict=True):
        assert not isinstance(seen.call, str)
        b = torch.zeros_like(seen.output) if b is None else b.detach()
        once = {r: n for r, n in seen.roles.items() if not plan[n].shared}
        acc = references[next(iter(seen.roles.values()))].dtype  # float32 for bfloat16
        seen = seen._replace(call=upcast_call(seen.call, acc))  # sums in float32 or wider
        b = upcast(b, acc)
        with torch.no_grad(), torch.autocast(b.device.type, enabled=False):
            if once:
                refs = {role: references[name] for role, name in once.items()}
                detached = seen.call._replace(
                    input=seen.call.input.detach(),
                    params={
                        r: None if t is None else t.detach() for r, t in seen.call.params.items()
                    },
                )
                found_results = compiled("forms")(seen.form.compute)(detached, b, layout, refs)
                for role, (d, sq) in found_results.items():
                    dots[once[role]], sq_norms[once[role]] = d, sq
            if len(once) < len(seen.roles):
                assert seen.form.parts is not None
                found_parts = seen.form.parts(seen.call, b, layout)
                for role, name in seen.roles.items():
                    if plan[name].shared:
                        parts.setdefault(name, []).append(found_parts[role])
    for name, found_parts in parts.items():
        if len(found_parts) == len(plan[name].shared):  # else: vmap, in the caller
            with torch.no_grad(), torch.autocast(references[name].device.type, enabled=False):
                dots[name], sq_norms[name] = combine(found_parts, references[name])
    grads = iter(end_grads)
    for name, found in consumers.items():
        with_grads = [
            (c, torch.zeros_like(c.output) if g is None else g.detach(), layout)
            for (c, layout), g in zip(found, grads, strict=False)
        ]
        with torch.no_grad():
            dots[name], sq_norms[name] = flow_results(
                params[name], with_grads, references[name], replayed.get(name)
            )
    return losses.detach(), grad_sum, dots, sq_norms


def flow_consumers(
    log: OpLog, plan: Mapping[str, PlanEntry], batch: int
) -> dict[str, list[tuple[Consumer, Layout]]]:
    """The consumers of each broadcast parameter, where its flows are those planned.

    A parameter whose operations differ from its plan's (another count or
    order, a consumer on another layout or written in place) is left out, and
    so gets no ghost value.
    """
    found: dict[str, list[tuple[Consumer, Layout]]] = {}
    for name, entry in plan.items():
        if entry.path != "ghost" or not entry.flow:
            continue
        flows = [f for f in log.flows if f.root == name]
        if tuple(f.op for f in flows) != entry.flow:
            continue
        consumers = [f.consumer for f in flows if f.consumer is not None]
        if len(consumers) != len(entry.shared):
            continue
        pairs = [(c, layout) for c, (_, layout) in zip(consumers, entry.shared, strict=True)]
        if all(
            not c.modified()
            and c.output.requires_grad
            and c.other.ndim > layout.axis
            and c.other.shape[layout.axis] == layout.rows * batch
            for c, layout in pairs
        ):
            found[name] = pairs
    return found


def _as_planned(log: OpLog, plan: Mapping[str, PlanEntry], batch: int) -> list[tuple[Seen, Layout]]:
    """The captured calls that are the ones their parameters were planned for, on this batch.

    A parameter read by several calls is planned with each call's form and
    layout in order; a call that does not match (another form, shape, or count
    of uses than traced, or an input or output written in place unlike in the
    traces) is dropped, and its parameters then get no ghost value.
    """
    position: dict[str, int] = {}
    found = []
    for seen in log.seen:
        planned: list[tuple[str, Layout] | None] = []
        for name in seen.read:
            k = position.get(name, 0)
            position[name] = k + 1
            entry = plan[name]
            if name not in seen.roles.values():
                planned.append(None)
            elif entry.shared:
                planned.append(entry.shared[k] if k < len(entry.shared) else None)
            else:
                planned.append((entry.form or "", entry.layout) if k == 0 else None)
        if isinstance(seen.call, str) or not seen.roles or None in planned:
            continue
        if seen.input_modified() or seen.output_modified() or not seen.output.requires_grad:
            continue  # written in place, unlike in the traces: no copy was made
        matched = [p for p in planned if p is not None]
        if any(form != seen.form.name for form, _ in matched):
            continue
        layouts = {layout for _, layout in matched}
        if len(layouts) != 1 or len(matched) != len(seen.roles):
            continue
        layout = layouts.pop()
        x = seen.call.input
        if x.ndim > layout.axis and x.shape[layout.axis] == layout.rows * batch:
            found.append((seen, layout))
    counts = {n: max(len(e.shared), 1) for n, e in plan.items() if e.path == "ghost" and not e.flow}
    return [
        (seen, layout)
        for seen, layout in found
        if all(log.uses.get(n) == counts[n] for n in seen.roles.values())
    ]
