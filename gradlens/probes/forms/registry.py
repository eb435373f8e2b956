"""The registry of ghost forms, and the op log that sees them in a forward (private).

:data:`FORMS` is the one table of layer kinds with a factored form (as
Opacus's ``grad_sample`` table, but keyed by the function the forward calls).
:class:`OpLog` is a ``TorchFunctionMode`` that, during one forward, counts
every operation reading each named parameter and notes each call of a
registered form that reads one. The plan (:mod:`gradlens.probes.plan`) runs it
on two traced forwards; the ghost pass (:mod:`gradlens.probes.ghost`) runs it again to
capture the inputs and outputs it needs. Where the traces saw a captured output
written in place later (``ReLU(inplace=True)``, ``out += identity``), the pass
hands the model a copy of it instead, so the output gradient still refers to
the call's own output; a write the traces did not see sends the parameter to
``vmap``.

Composite functions that hand parameters to inner operations, here
``F.multi_head_attention_forward``, are *transparent*: the log runs torch's own
code of that function (a copy whose own torch-function check is off, nothing
patched) with itself active, so it sees the ``F.linear`` calls inside. Inside
``nn.MultiheadAttention``, self-attention reads ``in_proj_weight`` once, by
``F.linear`` on ``(token, example, 3 d)``, and ``out_proj`` is ``F.linear`` on
``(token * example, d)``, flattened token-major; cross-attention splits
``in_proj_weight`` first, which has no factored form here.

:func:`establish_layout` finds a captured input's example axis from its shapes
and values at two batch sizes; it never guesses.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Collection, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from gradlens.probes.forms.base import Call, Form, Layout, to_examples
from gradlens.probes.forms.broadcast import Flow, consumer_of
from gradlens.probes.forms.conv import CONV
from gradlens.probes.forms.embedding import EMBEDDING
from gradlens.probes.forms.linear import ADDMM, LINEAR
from gradlens.probes.forms.norm import NORMS

__all__ = [
    "FORMS",
    "MAX_FLOW",
    "OVERFLOW",
    "OpLog",
    "Seen",
    "establish_layout",
    "register_form",
    "registry_version",
    "tensors_in",
]

FORMS: tuple[Form, ...] = (LINEAR, ADDMM, *CONV, EMBEDDING, *NORMS)
"""Every layer kind with a factored form."""

MAX_FLOW = 64
"""Operations followed per parameter; past them the broadcast form is not tried."""

OVERFLOW = "(more operations than MAX_FLOW)"
"""The operation name of the flow that marks a parameter followed no further."""

_BY_FUNC = {func: form for form in FORMS for func in form.funcs}
_VERSION = [0]  # bumped by register_form: cached plans made before it are not reused


def register_form(form: Form, *, replace: bool = False) -> None:
    """Give the ghost path a factored form for more functions (as Opacus's register_grad_sampler).

    A form is recognised by the function the forward calls (``form.funcs``,
    as seen by a ``TorchFunctionMode``: for ``F.bilinear`` that is
    ``torch.bilinear``). From the next plan on, a parameter read only by calls
    of a registered form, and by no other operation, takes the ghost path; the
    plan still establishes each call's example layout and checks that the
    forward does not mix examples, so a wrong ``bind`` is refused, not trusted.
    ``docs/contributing.md`` walks through one form and its test against the
    float64 loop.

    Args:
        form: The form: ``bind`` the call, ``compute`` the dots and squared norms.
        replace: Replace the form already registered for one of ``form.funcs``.

    Raises:
        ValueError: If a function already has another form and not ``replace``.
    """
    taken = sorted({_BY_FUNC[f].name for f in form.funcs if f in _BY_FUNC} - {form.name})
    if taken and not replace:
        raise ValueError(
            f"{form.name!r} covers functions that already have the form(s) {taken}: pass "
            "replace=True to replace them, or give the form only functions that have none."
        )
    for func in form.funcs:
        _BY_FUNC[func] = form
    _VERSION[0] += 1


def registry_version() -> int:
    """How many times :func:`register_form` has changed the registry (part of the plan key)."""
    return _VERSION[0]


def _transparent(func: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of a ``torch.nn.functional`` composite whose own torch-function check is off.

    Only the copy's global names ``has_torch_function*`` differ; the functions
    it calls keep theirs, so an active mode sees each operation inside it.
    """
    names = dict(func.__globals__)
    for check in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        names[check] = lambda *_: False
    copy = types.FunctionType(
        func.__code__, names, func.__name__, func.__defaults__, func.__closure__
    )
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


_TRANSPARENT = {
    func: _transparent(func)
    for func in (F.multi_head_attention_forward,)
    if isinstance(func, types.FunctionType)  # a Python function in this torch version
}


class Seen(NamedTuple):
    """One call of a registered form that read a named parameter.

    Attributes:
        form: The form.
        call: Its bound call, or why this call has no factored form.
        roles: Role -> parameter name, for the named parameters in its slots.
        read: Every named parameter among its arguments.
        output: What the call returned (the original, not the copy handed on).
        version: ``call.input._version`` when called, to detect later in-place writes.
        output_version: ``output._version`` when called, likewise.
    """

    form: Form
    call: Call | str
    roles: dict[str, str]
    read: list[str]
    output: Tensor
    version: int
    output_version: int

    def input_modified(self) -> bool:
        """Whether the captured input was written in place after the call."""
        return isinstance(self.call, Call) and self.call.input._version != self.version

    def output_modified(self) -> bool:
        """Whether the captured output was written in place after the call."""
        return self.output._version != self.output_version


class OpLog(TorchFunctionMode):
    """Count the operations reading each named tensor; note calls of registered forms.

    With ``flows``, it also follows those parameters through every operation
    that reads them or a tensor computed from them (``derived``), up to the
    elementwise calls that apply them to other tensors
    (:mod:`gradlens.probes.forms.broadcast`), and records each as a
    :class:`~gradlens.probes.forms.broadcast.Flow`.

    Args:
        names: ``id(tensor) -> name`` for the parameters to watch.
        copy_outputs: Parameter names whose calls hand the forward a copy of
            their output, not the output itself.
        flows: ``id(tensor) -> name`` for the parameters to follow.
    """

    def __init__(
        self,
        names: dict[int, str],
        *,
        copy_outputs: Collection[str] = (),
        flows: dict[int, str] | None = None,
    ) -> None:
        super().__init__()
        self.names = names
        self.copy_outputs = copy_outputs
        self.uses: dict[str, int] = {}
        self.readers: dict[str, list[str]] = {}
        self.seen: list[Seen] = []
        self.flow_names = flows or {}
        self.derived: dict[int, list[str]] = {}
        self.flows: list[Flow] = []
        self.flow_counts: dict[str, int] = {}
        self._kept: list[Tensor] = []  # derived tensors stay alive: their ids stay theirs

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        inner = _TRANSPARENT.get(func)
        if inner is not None:
            with self:  # see the operations inside
                return inner(*args, **kwargs)
        out = func(*args, **kwargs)
        if not any(True for _ in _tensors(out)):
            return out  # a metadata query (shape, dim, requires_grad) is no use
        if self.flow_names:
            self._follow(func, args, kwargs, out)
        read = [self.names[id(t)] for t in _tensors((args, kwargs)) if id(t) in self.names]
        for name in read:
            self.uses[name] = self.uses.get(name, 0) + 1
            self.readers.setdefault(name, []).append(_op_name(func))
        form = _BY_FUNC.get(func)
        if not read or form is None or not isinstance(out, Tensor):
            return out
        call = form.bind(args, kwargs)
        roles: dict[str, str] = {}
        version = 0
        if isinstance(call, Call):
            roles = {
                role: self.names[id(t)]
                for role, t in call.params.items()
                if t is not None and id(t) in self.names
            }
            version = call.input._version
        self.seen.append(Seen(form, call, roles, read, out, version, out._version))
        return out.clone() if any(n in self.copy_outputs for n in read) else out

    def _roots(self, t: Tensor) -> list[str]:
        """The followed parameters ``t`` is, or was computed from."""
        name = self.flow_names.get(id(t))
        return [name] if name is not None else self.derived.get(id(t), [])

    def _follow(self, func: Any, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        """Record a flow of each followed parameter this call reads; mark what it computes.

        A call that applies the flow of one parameter to the examples (a consumer
        of it) ends that flow; its output is computed from the other parameters
        its arguments were computed from.
        """
        roots = sorted({r for t in _tensors((args, kwargs)) for r in self._roots(t)})
        outputs = list(_tensors(out))
        for root in roots:
            count = self.flow_counts.get(root, 0)
            if count >= MAX_FLOW:
                continue  # an OVERFLOW flow was recorded: the plan refuses the broadcast form
            self.flow_counts[root] = count + 1
            if count + 1 == MAX_FLOW:
                self.flows.append(Flow(root, OVERFLOW, [], None))
                continue
            consumer = consumer_of(func, args, kwargs, out, lambda t, r=root: r in self._roots(t))
            versions = tuple(t._version for t in _tensors((args, kwargs)))
            call = (func, args, kwargs)
            self.flows.append(Flow(root, _op_name(func), outputs, consumer, call, versions))
            if consumer is not None:
                continue
            for t in outputs:
                known = self.derived.setdefault(id(t), [])
                if root not in known:
                    known.append(root)
                    self._kept.append(t)


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """The tensors in ``obj`` and in its lists, tuples and dicts."""
    return _tensors(obj)


def _tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in ``obj`` and in its lists, tuples and dicts (cheaper than a pytree walk)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _op_name(func: Any) -> str:
    """How a plan names an operation: ``linear``, ``Tensor.T``, ``split``."""
    name = getattr(func, "__name__", repr(func))
    owner = getattr(func, "__self__", None)
    if name == "__get__" and owner is not None:  # a property, such as Tensor.T
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    return name


def establish_layout(
    first: Tensor, second: Tensor, index: Tensor, batch: int, *, check_values: bool
) -> Layout | str:
    """The example layout of one captured input, from two traced forwards.

    The second forward ran on rows ``index`` of the first's batch. The example
    axis is the one axis whose size went from ``rows * example`` to
    ``rows * len(index)``, every other axis unchanged. With ``check_values``
    (no randomness), the second input must also equal the first's rows
    ``index`` under that layout, which settles the row order of a flattened
    ``(example, token)`` axis; without it a flattened axis is refused.

    Args:
        first: The input at the real batch, ``example`` examples.
        second: The input at the second batch.
        index: Which examples of the first batch the second holds, ``(example_2,)``.
        batch: The number of examples of the first forward.
        check_values: Compare values (the forward draws no random numbers).

    Returns:
        The :class:`Layout`, or why there is none.
    """
    batch_2 = index.shape[0]
    s1, s2 = tuple(first.shape), tuple(second.shape)
    if s1 == s2:
        return (
            f"its input {s1} does not change with the batch size: it is applied to "
            "something other than the examples (a table or buffer)"
        )
    changed = [k for k, (s, t) in enumerate(zip(s1, s2, strict=False)) if s != t]
    rows = s1[changed[0]] // batch if len(changed) == 1 and len(s1) == len(s2) else 0
    if rows == 0 or s1[changed[0]] != rows * batch or s2[changed[0]] != rows * batch_2:
        return f"no single example axis in its input: {s1} at {batch} examples, {s2} at {batch_2}"
    axis = changed[0]
    if not check_values:
        if rows == 1:
            return Layout(axis)
        return (
            f"axis {axis} of its input {s1} holds {rows} rows per example, in an order "
            "that cannot be checked when the forward draws random numbers"
        )
    orders = [False] if rows == 1 else [False, True]
    fits = [o for o in orders if _rows_match(first, second, Layout(axis, rows, o), index)]
    if fits and (len(fits) == 1 or batch == 1):
        return Layout(axis, rows, fits[0])
    if not fits:
        return (
            f"the rows of its input {s1} along axis {axis} are not each example's own rows "
            "(they changed when other examples changed)"
        )
    return f"axis {axis} of its input {s1} fits both row orders of {rows} rows per example"


def _rows_match(first: Tensor, second: Tensor, layout: Layout, index: Tensor) -> bool:
    """Whether ``second`` equals ``first``'s examples ``index`` under ``layout``."""
    batch = first.shape[layout.axis] // layout.rows
    want = to_examples(first.detach(), layout, batch)[index]
    got = to_examples(second.detach(), layout, index.shape[0])
    if not first.is_floating_point():
        return bool(torch.equal(got, want))
    scale = float(want.abs().max()) if want.numel() else 0.0
    tol = max(1e-4, 50 * torch.finfo(first.dtype).eps) * max(scale, 1e-30)
    return bool(float((got - want).abs().max()) <= tol) if want.numel() else True
