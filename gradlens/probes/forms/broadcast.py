"""The broadcast form: parameters added to, or multiplying, the examples (private).

Some parameters meet the examples only in an elementwise ``add``, ``sub`` or
``mul`` that broadcasts them over the examples: a class or position table
added to the tokens (``x + pos_embedding``), a class token expanded to the batch
(``class_token.expand(example, -1, -1)``), a bias in any layout
(``x + b.view(1, -1, 1, 1)``), a Hugging Face ``LlamaRMSNorm`` or T5 norm
weight (``weight * hidden``), GPT-2's ``wpe`` (``F.embedding`` of position ids
shared by every example, then added to the token embeddings). Each is a
*flow*: the parameter ``p`` passes through operations that do not see the
examples (``view``, ``to``, ``F.embedding`` of shared ids, ...: their outputs
are the same for any batch), to ``d = f(p)``, which *consumers* ``o = x + d``,
``x - d``, ``d - x`` or ``d * x`` apply to a tensor ``x`` with an example axis.
Example ``i``'s gradient of ``d`` from one consumer is its output gradient
``b_i`` (times ``x_i`` for ``mul``, negated for a subtracted ``d``), summed over
the axes ``d`` is broadcast along; example ``i``'s gradient of ``p`` is the
vector-Jacobian product of ``f`` with these, summed over the consumers
(``torch.autograd.grad(..., is_grads_batched=True)``; the identity when
``d`` is ``p``), through the operations of ``f`` run again from ``p``
(:func:`replay`), so the ghost pass need not keep the forward's graph. It is
exact under what the plan establishes (:mod:`gradlens.probes.plan`):

- every operation that reads ``p``, or a tensor computed from it, is either a
  consumer, whose ``x`` has an established example layout and ``d`` is
  broadcast along that axis, or gives the same outputs (shapes and values) in
  both traced forwards, so ``f`` does not see the examples;
- no tensor computed from ``p`` is returned by the forward (its gradient would
  come from the loss, not through a consumer), and no consumer's ``x`` or
  output is written in place later;
- each consumer's output row of example ``k`` reaches only example ``k``'s
  output: checked for the first and the last example of the first trace, by
  the gradient of that example's output (with random weights) with respect to
  every consumer's output, zero in every other example's rows. The values of
  ``x`` and the check that the forward does not mix examples prove this for a
  ``x`` that holds the examples' data; the gradients prove it for an ``x``
  whose rows are all equal (an expanded class token, ``zeros(example, d) + p``).

:class:`~gradlens.probes.forms.registry.OpLog` records the flows
(:class:`Flow`); :func:`flow_results` gives the dots and norms in the ghost pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.probes.forms.base import Layout, argument, from_materialised, to_examples

__all__ = [
    "BROADCAST",
    "Consumer",
    "Flow",
    "consumer_of",
    "flow_results",
    "operand_grads",
    "replay",
]

BROADCAST = "broadcast"
"""The ``form`` of a plan entry on this path."""

_CHUNK_ELEMENTS = 2**24
"""Most per-example gradient entries built at once."""

# func -> (kind, coefficient of the first operand, of the second); "mul" multiplies by the other.
_KINDS: dict[Any, tuple[str, float, float]] = {
    torch.add: ("add", 1.0, 1.0),
    torch.Tensor.add: ("add", 1.0, 1.0),
    torch.Tensor.__radd__: ("add", 1.0, 1.0),
    torch.sub: ("add", 1.0, -1.0),
    torch.Tensor.sub: ("add", 1.0, -1.0),
    torch.Tensor.__rsub__: ("add", -1.0, 1.0),  # a.__rsub__(b) = b - a
    torch.mul: ("mul", 1.0, 1.0),
    torch.Tensor.mul: ("mul", 1.0, 1.0),
    torch.Tensor.__rmul__: ("mul", 1.0, 1.0),
}


class Consumer(NamedTuple):
    """One call applying a flow's tensor ``d`` to a tensor ``x`` of the examples.

    Attributes:
        kind: ``"add"`` (``o = x + sign d``), ``"mul"`` (``o = d x``) or
            ``"linear"`` (``o = F.linear(x, d)``).
        sign: The coefficient of ``d`` in ``o`` for ``"add"``.
        operand: ``d``.
        other: ``x``, shape equal to the output's.
        output: ``o``.
        other_version: ``x._version`` when called.
        output_version: ``o._version`` when called.
    """

    kind: str
    sign: float
    operand: Tensor
    other: Tensor
    output: Tensor
    other_version: int
    output_version: int

    def modified(self) -> bool:
        """Whether ``x`` or ``o`` was written in place after the call."""
        return (
            self.other._version != self.other_version or self.output._version != self.output_version
        )


class Flow(NamedTuple):
    """One operation reading a parameter ``root``, or a tensor computed from it.

    Attributes:
        root: The parameter's name.
        op: The operation's name.
        outputs: Its tensor outputs.
        consumer: Set when it applies the flow to the examples elementwise.
        call: ``(function, args, kwargs)``, to run it again (:func:`replay`).
        versions: ``_version`` of each tensor among the arguments when called.
    """

    root: str
    op: str
    outputs: list[Tensor]
    consumer: Consumer | None
    call: tuple[Any, tuple, dict[str, Any]] | None = None
    versions: tuple[int, ...] = ()


def consumer_of(
    func: Any, args: tuple, kwargs: dict[str, Any], out: Any, tracked: Any
) -> Consumer | None:
    """The call as a :class:`Consumer`, or ``None`` when it is not one.

    Args:
        func: The function called.
        args: Its positional arguments.
        kwargs: Its keyword arguments.
        out: What it returned.
        tracked: ``tracked(t)``: whether ``t`` is a flow's parameter or computed from one.
    """
    if func is F.linear and isinstance(out, Tensor):
        return _linear_consumer(args, kwargs, out, tracked)
    if func is torch.Tensor.expand and isinstance(out, Tensor) and tracked(args[0]):
        if tuple(out.shape) == tuple(args[0].shape) or not args[0].requires_grad:
            return None
        return Consumer("add", 1.0, args[0], out, out, out._version, out._version)
    kind = _KINDS.get(func)
    if kind is None or len(args) < 1 or not isinstance(out, Tensor):
        return None
    a, b = args[0], argument(args, kwargs, 1, "other", None)
    alpha = argument(args, kwargs, 2, "alpha", 1)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or alpha != 1 or "out" in kwargs:
        return None
    if tracked(a) == tracked(b):
        return None  # both or neither computed from a parameter
    first = tracked(a)
    operand, other = (a, b) if first else (b, a)
    if tuple(out.shape) != tuple(other.shape) or out is other or out is operand:
        return None  # d is not broadcast into x, or the call is in place
    if not operand.requires_grad:
        return None  # detached: no gradient reaches the parameter through this call
    sign = kind[1] if first else kind[2]
    return Consumer(kind[0], sign, operand, other, out, other._version, out._version)


def _linear_consumer(
    args: tuple, kwargs: dict[str, Any], out: Tensor, tracked: Any
) -> Consumer | None:
    """``F.linear(x, w, c)`` with ``w`` or ``c`` (not both) computed from the parameter."""
    x = argument(args, kwargs, 0, "input", None)
    w = argument(args, kwargs, 1, "weight", None)
    c = argument(args, kwargs, 2, "bias", None)
    if not isinstance(x, Tensor) or tracked(x) or x.ndim < 2:
        return None
    by_c = isinstance(c, Tensor) and tracked(c) and c.requires_grad
    if isinstance(w, Tensor) and tracked(w) and w.requires_grad and not by_c:
        return Consumer("linear", 1.0, w, x, out, x._version, out._version)
    if by_c and not tracked(w):  # the bias is added to the output
        return Consumer("add", 1.0, c, out, out, out._version, out._version)
    return None


def operand_grads(consumer: Consumer, grad_output: Tensor, layout: Layout) -> Tensor:
    """Each example's gradient of the consumer's ``d``.

    Args:
        consumer: The call; ``x`` has ``layout``.
        grad_output: Gradient of the summed per-example losses w.r.t. ``o``, ``o``'s shape.
        layout: The example layout of ``x`` (and ``o``).

    Returns:
        Shape ``(example, *d)``.
    """
    d = consumer.operand
    batch = grad_output.shape[layout.axis] // layout.rows
    if consumer.kind == "linear":  # sum_t b_t a_t^T, (example, d_out, d_in)
        a = to_examples(consumer.other.detach(), layout, batch)
        b = to_examples(grad_output, layout, batch)
        a, b = a.reshape(batch, -1, a.shape[-1]), b.reshape(batch, -1, b.shape[-1])
        return torch.einsum("eto,eti->eoi", b, a.to(b.dtype)).to(d.dtype)
    if consumer.kind == "mul":
        c = grad_output * consumer.other.detach()
    else:
        c = grad_output * consumer.sign
    c = to_examples(c, layout, batch).sum(dim=1)  # (example, *o without the example axis)
    shape = broadcast_shape(d, grad_output.ndim)
    del shape[layout.axis]  # 1: d does not change with the batch
    dims = tuple(k + 1 for k, (s, t) in enumerate(zip(shape, c.shape[1:], strict=True)) if s < t)
    if dims:
        c = c.sum(dim=dims, keepdim=True)
    return c.unsqueeze(layout.axis + 1).reshape(batch, *d.shape).to(d.dtype)


def broadcast_shape(d: Tensor, ndim: int) -> list[int]:
    """``d``'s shape as broadcast against ``ndim`` axes (leading ones added)."""
    return [1] * (ndim - d.ndim) + list(d.shape)


def replay(param: Tensor, flows: Sequence[Flow], tensors: Any) -> dict[int, Tensor] | None:
    """Run a parameter's example-free operations again, from ``param``, with a graph of their own.

    So the ghost pass need not keep the forward's graph for the vector-Jacobian
    products of :func:`flow_results`: the same operations on the same values
    give the same function of ``param``.

    Args:
        param: The parameter (a leaf that requires grad).
        flows: Its flows in the ghost pass, in order.
        tensors: ``tensors(obj)``: the tensors in nested arguments.

    Returns:
        ``id(tensor of the forward) -> the same tensor computed again``, or
        ``None`` where an operation cannot be run again exactly (in place, or an
        argument written in place since).
    """
    done: dict[int, Tensor] = {id(param): param}
    for flow in flows:
        if flow.consumer is not None:
            continue
        if flow.call is None or _in_place(flow.op):
            return None
        func, args, kwargs = flow.call
        if tuple(t._version for t in tensors((args, kwargs))) != flow.versions:
            return None
        if func is F.embedding and argument(args, kwargs, 3, "max_norm", None) is not None:
            return None  # it would renormalise the table in place again
        args, kwargs = _swap((args, kwargs), done)
        with torch.enable_grad():
            out = func(*args, **kwargs)
        found = list(tensors(out))
        if len(found) != len(flow.outputs):
            return None
        done.update((id(old), new) for old, new in zip(flow.outputs, found, strict=True))
    return done


def _in_place(op: str) -> bool:
    """Whether an operation's name says it writes its input (``mul_``, ``__iadd__``)."""
    return (op.endswith("_") and not op.endswith("__")) or op.startswith("__i")


def _swap(obj: Any, done: dict[int, Tensor]) -> Any:
    """``obj`` with each tensor of ``done`` replaced by its value run again (nested)."""
    if isinstance(obj, Tensor):
        return done.get(id(obj), obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(item, done) for item in obj)
    if isinstance(obj, dict):
        return {k: _swap(v, done) for k, v in obj.items()}
    return obj


def flow_results(
    param: Tensor,
    consumers: Sequence[tuple[Consumer, Tensor, Layout]],
    references: Tensor,
    replayed: dict[int, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Dots and squared norms of a parameter on the broadcast path.

    Args:
        param: The parameter, the leaf the forward read.
        consumers: Each consumer, the output gradient of its ``o``, and ``x``'s layout.
        references: Shape ``(reference, *param)``.
        replayed: From :func:`replay`; without it the forward's graph from
            ``param`` to each ``d`` must still be there.

    Returns:
        ``(dots (example, reference), sq_norms (example,))``.
    """
    cotangents = [operand_grads(c, b, layout) for c, b, layout in consumers]
    operands = [c.operand for c, _, _ in consumers]
    if replayed is not None:
        operands = [replayed.get(id(d), d) for d in operands]
    batch = cotangents[0].shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(param.numel(), 1))
    dots, sq_norms = [], []
    for start in range(0, batch, step):
        chunk = [g[start : start + step] for g in cotangents]
        if all(d is param for d in operands):
            grads = torch.stack(chunk).sum(dim=0)
        else:
            with torch.enable_grad():
                (grads,) = torch.autograd.grad(
                    operands, [param], chunk, retain_graph=True, is_grads_batched=True
                )
        d, sq = from_materialised(grads, references)
        dots.append(d)
        sq_norms.append(sq)
    return torch.cat(dots), torch.cat(sq_norms)
