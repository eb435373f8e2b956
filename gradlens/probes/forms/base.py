"""What a layer kind must give to take the ghost path, and the example layout (private).

A *form* is one kind of operation that reads parameters linearly (``F.linear``,
``torch.addmm`` of HF ``Conv1D``, ``F.conv1d``/``F.conv2d``, ``F.embedding``, the
normalisations). It is recognised at the op level, by the function the forward
calls (seen through a ``TorchFunctionMode``), not by module type, so a layer
reached functionally is seen as well as one called as a module. Each form gives

- ``bind(args, kwargs)``: the call's input (the tensor that carries the
  examples), its parameters by role (``"weight"``, ``"bias"``) and options, or
  a reason why this call has no factored form (``max_norm``, training-mode
  BatchNorm);
- ``compute(call, grad_output, layout, references)``: per role, the inner
  products with ``K`` references, shape ``(example, K)``, and the squared norms,
  ``(example,)``, of each example's gradient, from the call's input and the
  gradient of the summed per-example losses with respect to its output.

Which axis of the input holds the examples is never read from sizes: the plan
(:mod:`gradlens.probes.plan`) establishes a :class:`Layout` from two traced
forwards. Every form here keeps the input's leading axes in its output
(``F.linear``: ``(..., d_in) -> (..., d_out)``; conv and norms keep axis 0), so
the output gradient has the same layout as the input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

Results = dict[str, tuple[Tensor, Tensor]]
"""Role -> ``(dots (example, reference), sq_norms (example,))``."""


class Layout(NamedTuple):
    """Where the examples are along one axis of a captured input.

    Attributes:
        axis: The axis of the input that holds the examples.
        rows: Rows of that axis per example (1 when each index is one example;
            ``token`` when ``(example, token)`` was flattened into one axis).
        token_major: With ``rows > 1``: whether the flattening was token-major
            (row ``t * example + i``, as inside ``nn.MultiheadAttention``)
            rather than example-major (row ``i * rows + t``, as in HF ``Conv1D``).
    """

    axis: int
    rows: int = 1
    token_major: bool = False


class Call(NamedTuple):
    """One recognised call of a form.

    Attributes:
        input: The tensor whose layout the plan establishes.
        params: Role -> the tensor passed in that slot (``None`` when absent).
        options: What ``compute`` needs besides (stride, eps, ...), and
            ``last_axis``, the last axis of ``input`` that may hold the examples.
    """

    input: Tensor
    params: dict[str, Tensor | None]
    options: dict[str, Any]


class Form(NamedTuple):
    """One layer kind with a factored form; see the module docstring.

    ``parts(call, grad_output, layout)`` gives, per role, the parameter's
    gradient in a form that adds across calls (:mod:`gradlens.probes.forms.shared`);
    ``shared`` names each role's kind (``"outer"`` or ``"materialised"``), and
    a role absent from it cannot be combined with other calls.
    """

    name: str
    funcs: tuple[Any, ...]
    bind: Callable[[tuple, dict[str, Any]], Call | str]
    compute: Callable[[Call, Tensor, Layout, Mapping[str, Tensor]], Results]
    parts: Callable[[Call, Tensor, Layout], dict[str, Any]] | None = None
    shared: Mapping[str, str] = MappingProxyType({})


def argument(args: tuple, kwargs: dict[str, Any], position: int, name: str, default: Any) -> Any:
    """An argument given by position or by name."""
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def to_examples(x: Tensor, layout: Layout, batch: int) -> Tensor:
    """Bring the examples of ``x`` to the front, ``(example, rows, *other axes)``.

    Args:
        x: A captured input or output gradient with ``layout``.
        layout: As established by the plan.
        batch: Number of examples.

    Returns:
        Shape ``(example, rows, ...)``, the other axes of ``x`` in order.
    """
    x = x.movedim(layout.axis, 0)
    if layout.token_major:
        return x.reshape(layout.rows, batch, *x.shape[1:]).transpose(0, 1)
    return x.reshape(batch, layout.rows, *x.shape[1:])


def from_materialised(grads: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """Dots and squared norms from per-example gradients ``(example, ...)``.

    Args:
        grads: Shape ``(example, *param)``.
        references: Shape ``(reference, *param)``.

    Returns:
        ``(dots (example, reference), sq_norms (example,))``.
    """
    flat = grads.flatten(start_dim=1)
    dots = flat @ references.reshape(references.shape[0], -1).T
    return dots, torch.linalg.vector_norm(flat, dim=1).square()
