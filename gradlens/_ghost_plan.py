"""Which parameters may take the ghost path, established by tracing the forward (private).

The ghost formulas of :mod:`gradlens._ghost_linear` are exact for a parameter
only if (1) it is the weight or bias of an ``nn.Linear`` called once, (2) no
other operation of the forward uses it (tied or shared weights, ``h @
lin.weight``), (3) one known axis of the layer's input is the example axis,
and (4) the forward does not mix examples. None of this can be read from the
sizes of one forward: a ``(token, example, d)`` input with ``token ==
example``, or a table with as many rows as the batch, look like ``(example,
token, d)``. So the forward is traced twice, on the batch
(``example`` rows) and on ``example - 1`` of its rows in reverse order (the
first row twice for a batch of one), under a ``TorchFunctionMode`` that logs
every operation that reads a selected parameter, and the shape of each
``F.linear`` input.

- The example axis of a linear input is the one axis whose size went from
  ``example`` to the second batch size, every other axis unchanged; none
  changed means the layer never sees the examples; anything else is ambiguous.
  Either way the parameter goes to ``vmap``: the plan never guesses.
- A parameter read by more than one operation goes to ``vmap``.
- The second trace's outputs must equal the matching rows of the first; if not,
  the forward mixes examples and :class:`UnsupportedModelError` is raised
  (skipped when ``randomness`` is not ``"error"``, as dropout masks differ).

Plans are cached per model (a ``WeakKeyDictionary``, at most
``CACHE_SIZE`` input signatures each) and hold only names, strings and ints.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> plan = ghost_plan(model, torch.randn(6, 4))
    >>> plan["0.weight"].path, plan["0.weight"].example_axis
    ('ghost', 0)
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from gradlens._ghost_linear import is_plain_linear
from gradlens._outputs import OutputSelector, no_kv_cache, select_output, selector_key
from gradlens.errors import UnsupportedModelError
from gradlens.per_example import Randomness, check_vmap_compatible, split_params

__all__ = ["CACHE_SIZE", "PlanEntry", "ghost_plan", "plan_for"]

CACHE_SIZE = 8
"""Input signatures whose plan is kept per model."""

_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Hashable, dict[str, PlanEntry]]] = (
    weakref.WeakKeyDictionary()
)


class PlanEntry(NamedTuple):
    """The path one parameter takes in ``per_example_dots`` and ``probe_batch``.

    Attributes:
        path: ``"ghost"`` (factored form) or ``"vmap"`` (per-example gradients).
        reason: Why, in words.
        example_axis: On the ghost path, the axis of the layer's input that
            holds the examples (0 for ``(example, ..., d_in)``); else ``None``.
    """

    path: Literal["ghost", "vmap"]
    reason: str
    example_axis: int | None = None


@dataclass
class _Trace:
    """What one traced forward showed."""

    uses: dict[str, int] = field(default_factory=dict)
    linear_input: dict[str, torch.Size] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    outputs: list[Tensor] = field(default_factory=list)


class _UseLog(TorchFunctionMode):
    """Count the operations that read each parameter; note ``F.linear`` input shapes."""

    def __init__(self, names: dict[int, str], trace: _Trace) -> None:
        super().__init__()
        self.names = names
        self.trace = trace

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(isinstance(t, Tensor) for t in tree_leaves(out)):
            return out  # a metadata query (shape, dim, requires_grad) is no use
        for t in tree_leaves((args, kwargs)):
            name = self.names.get(id(t)) if isinstance(t, Tensor) else None
            if name is not None:
                self.trace.uses[name] = self.trace.uses.get(name, 0) + 1
        if func is torch._C._nn.linear:
            slots = [*args[1:3], kwargs.get("weight"), kwargs.get("bias")]
            for t in slots:
                if isinstance(t, Tensor) and id(t) in self.names:
                    self.trace.linear_input[self.names[id(t)]] = args[0].shape
        return out


def _linear_owners(model: nn.Module, names: Collection[str]) -> dict[str, str]:
    """Parameter name -> module name, for the selected weights and biases of ``nn.Linear``."""
    owners = {}
    for module_name, module in model.named_modules():
        if is_plain_linear(module):
            prefix = f"{module_name}." if module_name else ""
            for p, _ in module.named_parameters(recurse=False):
                if prefix + p in names:
                    owners[prefix + p] = module_name
    return owners


def _trace(
    model: nn.Module,
    selected: dict[str, Tensor],
    frozen: dict[str, Tensor],
    inputs: Tensor,
    owners: dict[str, str],
    output: OutputSelector | None = None,
) -> _Trace:
    """Run the forward once, logging uses, linear inputs and module calls; keep no graph."""
    trace = _Trace()
    modules = dict(model.named_modules())
    handles = []
    for module_name in set(owners.values()):

        def count(*_: object, name: str = module_name) -> None:
            trace.calls[name] = trace.calls.get(name, 0) + 1

        handles.append(modules[module_name].register_forward_hook(count))
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # a forward may update them
    # With grad, as in the ghost pass: a module may branch on grad mode (fast paths).
    params = {n: p.detach().requires_grad_() for n, p in selected.items()}
    names = {id(t): n for n, t in params.items()}
    try:
        with torch.enable_grad(), _UseLog(names, trace):
            out = functional_call(model, (params, frozen, buffers), (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    trace.outputs = [select_output(out, output).detach()]
    return trace


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


def _example_axis(first: torch.Size, second: torch.Size, sizes: tuple[int, int]) -> int | str:
    """The example axis of a linear input seen at two batch sizes, or why there is none."""
    changed = [k for k, (s, t) in enumerate(zip(first, second, strict=False)) if s != t]
    if first == second:
        return (
            f"its input {tuple(first)} does not change with the batch size: it is applied "
            "to something other than the examples (a table or buffer)"
        )
    if len(first) != len(second) or len(changed) != 1:
        changed = [-1]
    if changed[0] < 0 or (first[changed[0]], second[changed[0]]) != sizes:
        return (
            f"no single example axis in its input: {tuple(first)} at {sizes[0]} examples, "
            f"{tuple(second)} at {sizes[1]}"
        )
    return changed[0]


def _decide(
    name: str, owner: str | None, first: _Trace, second: _Trace, sizes: tuple[int, int]
) -> PlanEntry:
    """The path of one parameter from the two traces."""
    if owner is None:
        return PlanEntry("vmap", "not the weight or bias of an nn.Linear")
    uses = (first.uses.get(name, 0), second.uses.get(name, 0))
    if uses[0] == 0:
        return PlanEntry("vmap", "not used in the forward")
    calls = (first.calls.get(owner, 0), second.calls.get(owner, 0))
    if calls != (1, 1):
        return PlanEntry(
            "vmap",
            f"its nn.Linear {owner!r} is called {calls[0]} times per forward, not once "
            "(applied several times, or its parameters read functionally)",
        )
    if uses != (1, 1):
        return PlanEntry(
            "vmap",
            f"read by {uses[0]} operations of the forward, not only by {owner!r}: a shared, "
            "tied or functional use",
        )
    if name not in first.linear_input or name not in second.linear_input:
        return PlanEntry("vmap", f"not read by the F.linear call of {owner!r}")
    axis = _example_axis(first.linear_input[name], second.linear_input[name], sizes)
    if isinstance(axis, str):
        return PlanEntry("vmap", axis)
    shape = tuple(first.linear_input[name])
    reason = f"nn.Linear {owner!r} called once on {shape}, example axis {axis}"
    return PlanEntry("ghost", reason, axis)


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
        tuple(inputs.shape),
        inputs.dtype,
        inputs.device,
        randomness,
        selector_key(output),
    )
    plans = _CACHE.setdefault(model, OrderedDict())
    if key in plans:
        plans.move_to_end(key)
        return dict(plans[key])
    batch = inputs.shape[0]
    index = torch.arange(batch - 1, 0, -1) if batch > 1 else torch.zeros(2, dtype=torch.long)
    index = index.to(inputs.device)
    owners = _linear_owners(model, selected)
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        first = _trace(model, selected, frozen, inputs, owners, output)
        second = _trace(model, selected, frozen, inputs[index], owners, output)
        if randomness == "error" and batch > 1:
            _check_not_mixing(
                first,
                second,
                index,
                model,
                lambda: _trace(model, selected, frozen, inputs, owners, output),
            )
    sizes = (batch, index.shape[0])
    plan = {n: _decide(n, owners.get(n), first, second, sizes) for n in selected}
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

    The same plan that :func:`~gradlens.per_example_dots` and
    :func:`~gradlens.probe_batch` follow (and return as ``Probe.plan``): the
    forward is traced at two batch sizes to establish each linear input's
    example axis and every use of each parameter (see
    :mod:`gradlens._ghost_plan`). Cached per model and input signature.

    Args:
        model: The model.
        inputs: Shape ``(example, ...)``, at least one example.
        params: Parameter names; default all that require grad.
        randomness: ``vmap`` randomness choice, as in :func:`~gradlens.per_example_dots`.
        output: Selector of the tensor the loss sees, as in :func:`~gradlens.per_example_dots`.

    Returns:
        Name -> :class:`PlanEntry` (``path``, ``reason``, ``example_axis``).

    Raises:
        ValueError: If ``inputs`` has no example.
        UnsupportedModelError: If the forward mixes examples, or as in
            :func:`~gradlens.per_example_grads`.
    """
    if inputs.shape[0] == 0:
        raise ValueError("ghost_plan needs at least one example to trace the forward.")
    check_vmap_compatible(model, randomness)
    selected, frozen = split_params(model, params)
    with no_kv_cache(model):
        return plan_for(model, inputs, selected, frozen, randomness, output)
