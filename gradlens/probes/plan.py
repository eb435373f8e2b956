"""Which parameters may take the ghost path, established by tracing the forward (private).

The factored forms of :mod:`gradlens.probes.forms.registry` (``FORMS``: ``F.linear``, HF
``Conv1D``'s ``torch.addmm``, ``F.conv1d``/``F.conv2d``, ``F.embedding``, the
affine parameters of the normalisations) are exact for a parameter only if
(1) exactly one operation of the forward reads it, a call of a registered form
with the parameter in a weight or bias slot (no tied or shared weight, no
``h @ lin.weight``, no ``x @ A.T``); (2) one established axis of that call's
input holds the examples; and (3) the forward does not mix examples. None of
this can be read from the sizes of one forward: a ``(token, example, d)`` input
with ``token == example``, or a table with as many rows as the batch, look like
``(example, token, d)``. So the forward is traced twice, on the batch
(``example`` rows) and on ``example - 1`` of its rows in reverse order (the
first row twice for a batch of one), under :class:`~gradlens.probes.forms.registry.OpLog`,
which counts every operation that reads a selected parameter and notes each
registered call.

- The example axis of a captured input is the one axis whose size went from
  ``rows * example`` to ``rows * example_2``, every other axis unchanged; the
  second input must equal the first's rows in the reversed order (values, when
  the forward draws no random numbers), which also settles whether a flattened
  ``(example, token)`` axis is example- or token-major. None changed means the
  layer never sees the examples; anything else is ambiguous. Either way the
  parameter goes to ``vmap``: the plan never guesses.
- A parameter read by more than one operation, or by one without a factored
  form, is tried on the broadcast form (:mod:`gradlens.probes.forms.broadcast`:
  the trace follows it through operations that do not see the examples to the
  ``add``/``mul``/``expand``/``F.linear`` calls that apply it to them, decided
  by :mod:`gradlens.probes.forms.flows`); failing that it goes to ``vmap``, and
  its entry names the operations.
- Each entry carries its modelled cost (:mod:`gradlens.probes.entry`,
  :mod:`gradlens.probes.forms.cost`); :func:`cheapest` is the plan ``auto``
  follows, ``vmap`` for all where that is modelled cheaper.
- The second trace's outputs must equal the matching rows of the first, and
  each example's output alone (:func:`check_rows_alone`) its row of the first;
  if not, the forward mixes examples and :class:`UnsupportedModelError` is
  raised (skipped when ``randomness`` is not ``"error"``, as dropout masks
  differ). The probes repeat the check on the first and last example of every
  batch, so a cached plan never accepts a batch that mixes through them.

Plans are cached per model (a ``WeakKeyDictionary``, at most
``CACHE_SIZE`` input signatures each) and hold only names, strings and ints.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> plan = ghost_plan(model, torch.randn(6, 4))
    >>> plan["0.weight"].path, plan["0.weight"].example_axis, plan["0.weight"].form
    ('ghost', 0, 'F.linear')
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradlens.errors import UnsupportedModelError
from gradlens.probes.batch import call, examples, signature, take
from gradlens.probes.checks import DeferredCheck, settle
from gradlens.probes.entry import PlanEntry, cheapest, with_costs
from gradlens.probes.forms.flows import by_root, check_routes, flow_entry
from gradlens.probes.forms.registry import (
    OpLog,
    Seen,
    establish_layout,
    registry_version,
    tensors_in,
)
from gradlens.probes.outputs import OutputSelector, plain_forward, select_output, selector_key
from gradlens.probes.vmap import Randomness, check_vmap_compatible, split_params

__all__ = [
    "CACHE_SIZE",
    "ROWS_AT_PLAN",
    "PlanEntry",
    "cheapest",
    "check_rows_alone",
    "ghost_plan",
    "plan_for",
    "rows_alone_check",
]

CACHE_SIZE = 8
"""Input signatures whose plan is kept per model."""

_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Hashable, dict[str, PlanEntry]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class _Trace:
    """What one traced forward showed."""

    log: OpLog
    outputs: list[Tensor] = field(default_factory=list)
    returned: set[str] = field(default_factory=set)  # roots of flows the forward returns
    raw: Tensor | None = None  # the output the loss sees, with its graph

    def calls_of(self, name: str) -> list[Seen]:
        """The registered calls that read ``name``."""
        return [s for s in self.log.seen if name in s.read]


def _trace(
    model: nn.Module,
    selected: dict[str, Tensor],
    frozen: dict[str, Tensor],
    inputs: Tensor,
    output: OutputSelector | None = None,
) -> _Trace:
    """Run the forward once under an :class:`OpLog`; keep no graph."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # a forward may update them
    # With grad, as in the ghost pass: a module may branch on grad mode (fast paths).
    params = {n: p.detach().requires_grad_() for n, p in selected.items()}
    ids = {id(t): n for n, t in params.items()}
    log = OpLog(ids, flows=ids)
    with torch.enable_grad(), log:
        out = call(model, (params, frozen, buffers), inputs)
    raw = select_output(out, output)
    outputs = [raw.detach()]
    returned = {r for t in tensors_in(out) for r in ([ids[id(t)]] if id(t) in ids else [])}
    returned |= {r for t in tensors_in(out) for r in log.derived.get(id(t), [])}
    return _Trace(log, outputs, returned, raw)


def _check_not_mixing(
    first: _Trace, second: _Trace, index: Tensor, model: nn.Module, again: Callable[[], _Trace]
) -> None:
    """Raise if the second trace's outputs differ from the first's rows ``index``.

    ``again`` repeats the first trace with fresh random draws: if its outputs
    differ too, the forward is random (dropout), not mixing.
    """
    for a, b in zip(first.outputs, second.outputs, strict=False):
        if a.ndim == 0 or b.shape[:1] != index.shape or not a.is_floating_point():
            continue
        want = a[index]
        if want.shape != b.shape or want.numel() == 0:
            continue
        tol = max(1e-4, 50 * torch.finfo(a.dtype).eps) * float(want.abs().max().clamp_min(1e-30))
        if float((b - want).abs().max()) > tol:
            if float((again().outputs[0] - first.outputs[0]).abs().max()) > tol:
                raise UnsupportedModelError(
                    f"{type(model).__name__} draws random numbers in its forward (dropout in "
                    "training mode, perhaps functional): pass randomness='different' (a draw "
                    "per example) or 'same', or call model.eval()."
                )
            raise UnsupportedModelError(
                f"{type(model).__name__} mixes examples: its output for an example changed "
                "when the other examples of the batch changed (batch statistics, centring "
                "over the batch, attention across the batch axis). Per-example gradients "
                "of such a forward are not defined, by ghost or by vmap: call model.eval(), "
                "normalise per example (LayerNorm, GroupNorm), or keep the examples apart."
            )


ROWS_AT_PLAN = 32
"""How many examples a new plan checks alone (every one of a batch up to this size)."""


def check_rows_alone(
    model: nn.Module,
    params: dict[str, Tensor],
    frozen: dict[str, Tensor],
    inputs: Tensor,
    batch_output: Tensor,
    output: OutputSelector | None,
    rows: Sequence[int] | None = None,
) -> None:
    """Raise if an example alone gives another output than in its batch.

    One forward of one example per row. It sees a forward that depends on the
    batch through a statistic of it, such as the longest example (padding
    trimmed to ``mask.sum(1).max()`` before a pooling over positions), which
    the plan's reversed sub-batch misses when another example is as long as
    the one it drops. A new plan checks every example alone (up to
    :data:`ROWS_AT_PLAN`); the probes check the first and the last example of
    every later batch, cached plan or not. What this cannot see: a later batch
    whose first and last examples are both among those that set the statistic
    (both longest) while others are shorter. One host read for all the rows
    (:func:`rows_alone_check` defers even that one).

    Args:
        model: The model.
        params: The probed parameters (detached).
        frozen: The other parameters.
        inputs: The batch, ``(example, ...)``.
        batch_output: The output the loss sees for the batch, ``(example, ...)``.
        output: The output selector.
        rows: The examples to check; default the first and the last.
    """
    check = rows_alone_check(model, params, frozen, inputs, batch_output, output, rows)
    settle([check], deferrable=False)  # planning reads now: the plan depends on it


def rows_alone_check(
    model: nn.Module,
    params: dict[str, Tensor],
    frozen: dict[str, Tensor],
    inputs: Tensor,
    batch_output: Tensor,
    output: OutputSelector | None,
    rows: Sequence[int] | None = None,
) -> DeferredCheck:
    """:func:`check_rows_alone` as a :class:`~gradlens.probes.checks.DeferredCheck`.

    The rows' forwards run now; their largest differences from the batch's
    rows are stacked and compared with the tolerance on the device. A row
    whose forward fails ends the check there (the rows before it are still
    compared); a row whose output has another shape fails it (reported after
    the rows before it, as one by one).
    """
    batch = examples(inputs)
    rows = (0, batch - 1) if rows is None else rows
    device = batch_output.device
    passed = DeferredCheck(torch.zeros((), dtype=torch.bool, device=device), lambda: None)
    if batch < 2 or not batch_output.is_floating_point() or batch_output.shape[:1] != (batch,):
        return passed
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    found: list[tuple[int, Tensor]] = []
    other_shape: str | None = None
    for row in rows:
        try:
            with torch.no_grad():
                alone = call(model, (params, frozen, buffers), take(inputs, slice(row, row + 1)))
            alone = select_output(alone, output)
        except Exception:
            break
        if alone.shape[1:] != batch_output.shape[1:]:
            other_shape = _mixing(
                model,
                f"example {row} alone has output shape {tuple(alone.shape[1:])}, in the batch "
                f"{tuple(batch_output.shape[1:])}",
            )
            break
        found.append((row, alone[0]))
    out = batch_output.detach()
    rel = max(1e-4, 50 * torch.finfo(out.dtype).eps)
    tol = rel * out.abs().max().clamp_min(1e-30).double()
    gaps = torch.stack(
        [(a - out[row]).abs().max().double() for row, a in found] or [tol.new_zeros(())]
    )
    off = gaps > tol  # (row,): the rows that differ, not read here

    def explain() -> None:
        if bool(off.any()):
            first = found[int(off.to(torch.uint8).argmax())][0]
            raise UnsupportedModelError(
                _mixing(model, f"example {first} alone gives another output")
            )
        if other_shape is not None:
            raise UnsupportedModelError(other_shape)

    if other_shape is not None:
        return DeferredCheck(torch.ones((), dtype=torch.bool, device=device), explain)
    return DeferredCheck(off.any(), explain)


def _mixing(model: nn.Module, what: str) -> str:
    return (
        f"{type(model).__name__} mixes examples: {what} than in its batch (the forward depends "
        "on the other examples: batch statistics, padding trimmed to the batch's longest "
        "example, attention across the batch axis). Per-example gradients of such a forward "
        "are not defined, by ghost or by vmap: trim and pool per example (pool over each "
        "example's own mask), call model.eval(), normalise per example, or keep the examples "
        "apart."
    )


def _decide(
    name: str, first: _Trace, second: _Trace, index: Tensor, batch: int, check_values: bool
) -> PlanEntry:
    """The path of one parameter from the two traces."""
    uses = (first.log.uses.get(name, 0), second.log.uses.get(name, 0))
    if uses[0] == 0:
        return PlanEntry("vmap", "not used in the forward")
    readers = first.log.readers[name]
    calls = (first.calls_of(name), second.calls_of(name))
    if uses[0] != uses[1] or len(calls[0]) != uses[0] or len(calls[1]) != uses[0]:
        if uses == (1, 1):
            return PlanEntry("vmap", f"read by {readers[0]}, which has no factored form")
        return PlanEntry(
            "vmap",
            f"read by {uses[0]} operations of the forward ({', '.join(readers)}), not all "
            "of them once each by a call with a factored form: a shared, tied or functional use",
        )
    found = [
        _call_layout(name, s, t, index, batch, check_values) for s, t in zip(*calls, strict=True)
    ]
    refused = [f for f in found if isinstance(f, str)]
    if refused:
        return PlanEntry("vmap", refused[0])
    decided = [f for f in found if not isinstance(f, str)]
    entry = decided[0]
    if len(decided) == 1:
        return entry
    kinds = {seen.form.shared.get(_role_of(name, seen), "") for seen in calls[0]}
    if len(kinds) != 1 or "" in kinds:
        forms = ", ".join(f"{e.form}" for e in decided)
        return PlanEntry(
            "vmap",
            f"read by {uses[0]} calls ({forms}) whose contributions have no combined "
            "factored form here",
        )
    reason = f"read by {uses[0]} calls, contributions added, cross terms in the norm: " + "; ".join(
        e.reason for e in decided
    )
    return entry._replace(
        reason=reason,
        copy_output=any(e.copy_output for e in decided),
        shared=tuple((e.form or "", e.layout) for e in decided),
    )


def _role_of(name: str, seen: Seen) -> str | None:
    """The slot of ``seen``'s call that holds ``name``."""
    return next((r for r, n in seen.roles.items() if n == name), None)


def _call_layout(
    name: str, seen: Seen, again: Seen, index: Tensor, batch: int, check_values: bool
) -> PlanEntry | str:
    """The ghost entry for one call reading ``name`` (seen in both traces), or why not."""
    if isinstance(seen.call, str):
        return seen.call
    assert not isinstance(again.call, str)
    role = _role_of(name, seen)
    if role is None or again.roles.get(role) != name:
        return f"read by {seen.form.name}, but not as its weight or bias"
    if seen.input_modified() or again.input_modified():
        return f"the input of its {seen.form.name} is written in place later"
    layout = establish_layout(
        seen.call.input, again.call.input, index, batch, check_values=check_values
    )
    if isinstance(layout, str):
        return layout
    shape = tuple(seen.call.input.shape)
    if layout.axis > seen.call.options["last_axis"]:
        return (
            f"the examples of its input {shape} are on axis {layout.axis}, where "
            f"{seen.form.name} has no example axis"
        )
    flat = f", {layout.rows} rows per example" if layout.rows > 1 else ""
    order = " (token-major)" if layout.token_major else ""
    reason = f"{seen.form.name} {role} on {shape}, example axis {layout.axis}{flat}{order}"
    copy = seen.output_modified() or again.output_modified()
    return PlanEntry(
        "ghost", reason, layout.axis, seen.form.name, layout.rows, layout.token_major, copy
    )


def plan_for(
    model: nn.Module,
    inputs: Tensor,
    selected: dict[str, Tensor],
    frozen: dict[str, Tensor],
    randomness: Randomness,
    output: OutputSelector | None = None,
) -> dict[str, PlanEntry]:
    """The (cached) plan of the selected parameters; see the module docstring.

    Args:
        model: The model.
        inputs: Shape ``(example, ...)`` with ``example >= 1``.
        selected: The parameters to plan, detached, as from ``split_params``.
        frozen: The other parameters.
        randomness: The ``vmap`` randomness choice; not ``"error"`` skips the mixing check.
        output: Selector of the tensor the loss sees; the mixing check compares it.

    Returns:
        Name -> :class:`PlanEntry`, a fresh dict.

    Raises:
        UnsupportedModelError: If the forward mixes examples.
    """
    key = (
        tuple(selected),
        tuple(id(p) for p in model.parameters()),
        tuple(m.training for m in model.modules()),
        signature(inputs),
        randomness,
        selector_key(output),
        registry_version(),
    )
    plans = _CACHE.setdefault(model, OrderedDict())
    if key in plans:
        plans.move_to_end(key)
        return dict(plans[key])
    batch = examples(inputs)
    device = next(iter(selected.values())).device
    index = torch.arange(batch - 1, 0, -1) if batch > 1 else torch.zeros(2, dtype=torch.long)
    index = index.to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        first = _trace(model, selected, frozen, inputs, output)
        second = _trace(model, selected, frozen, take(inputs, index), output)
        if randomness == "error" and batch > 1:
            _check_not_mixing(
                first,
                second,
                index,
                model,
                lambda: _trace(model, selected, frozen, inputs, output),
            )
            every = range(min(batch, ROWS_AT_PLAN))
            check_rows_alone(model, selected, frozen, inputs, first.outputs[0], output, every)
    check = randomness == "error"
    plan = {n: _decide(n, first, second, index, batch, check) for n in selected}
    flows = (by_root(first.log), by_root(second.log))
    for name, entry in plan.items():
        if entry.path == "vmap" and entry.reason != "not used in the forward":
            pair = (flows[0].get(name, []), flows[1].get(name, []))
            returned = name in first.returned or name in second.returned
            found = flow_entry(pair, returned, index, batch, check)
            if isinstance(found, str):  # say why when it is not the reader the entry names
                same = bool(pair[0]) and found.startswith(f"read by {pair[0][0].op},")
                found = entry if same else entry._replace(reason=f"{entry.reason}; {found}")
            plan[name] = found
    check_routes(plan, flows[0], first.raw)
    plan = with_costs(plan, first.log, selected, batch)
    del first, second  # the traces hold activations; the plan holds only names and ints
    plans[key] = plan
    if len(plans) > CACHE_SIZE:
        plans.popitem(last=False)
    return dict(plan)


def ghost_plan(
    model: nn.Module,
    inputs: Tensor,
    *,
    params: Collection[str] | None = None,
    randomness: Randomness = "error",
    output: OutputSelector | None = None,
) -> dict[str, PlanEntry]:
    """Which path ``method="auto"`` takes for each parameter on these inputs, and why.

    The plan that :func:`~gradlens.per_example_dots` and
    :func:`~gradlens.probe_batch` follow (and return as ``Probe.plan``): the
    forward is traced at two batch sizes to establish the example axis of
    each captured layer input and every use of each parameter (see
    :mod:`gradlens.probes.plan`). Cached per model and input signature. Each
    entry carries its modelled ``cost``; where some parameter has no factored
    form and the model says ``vmap`` for every parameter is cheaper than the
    ghost pass plus a ``vmap`` pass for the rest, ``auto`` takes ``vmap`` for
    all and its ``Probe.plan`` says so (``cheapest(ghost_plan(...))`` here;
    :mod:`gradlens.probes.forms.cost`).

    Args:
        model: The model.
        inputs: Shape ``(example, ...)``, at least one example.
        params: Parameter names; default all that require grad.
        randomness: ``vmap`` randomness choice, as in :func:`~gradlens.per_example_dots`.
        output: Selector of the tensor the loss sees, as in :func:`~gradlens.per_example_dots`.

    Returns:
        Name -> :class:`PlanEntry` (``path``, ``reason``, ``example_axis``, ``form``, ...).

    Raises:
        ValueError: If ``inputs`` has no example.
        UnsupportedModelError: If the forward mixes examples, or as in
            :func:`~gradlens.per_example_grads`.
    """
    if examples(inputs) == 0:
        raise ValueError("ghost_plan needs at least one example to trace the forward.")
    check_vmap_compatible(model, randomness)
    selected, frozen = split_params(model, params)
    with plain_forward(model):
        return plan_for(model, inputs, selected, frozen, randomness, output)
