"""Ghost inner products and norms of ``nn.Linear`` parameters (private).

A linear layer ``z = a W^T + c`` sees input activations ``a`` of shape
``(example, token, d_in)`` (``token`` = 1 for 2-D inputs). Backpropagating the
*sum* of the per-example losses to its outputs gives ``b`` of shape
``(example, token, d_out)`` with ``b_i = dloss_i / dz_i``: example ``i``'s output
depends on example ``i``'s input only, so the other losses add nothing. Example
``i``'s gradients are then

- ``G_i = sum_t b_it a_it^T`` for the weight, shape ``(d_out, d_in)``, and
- ``sum_t b_it`` for the bias, shape ``(d_out,)``,

and for a reference ``R`` (weight) and ``r`` (bias):

- ``<G_i, R> = sum_t b_it^T R a_it``, one matmul over the batch;
- ``||G_i||^2 = sum_{t,s} (a_it . a_is)(b_it . b_is)``, the product of the
  token Gram matrices of ``a_i`` and ``b_i``, costing ``token^2 (d_in + d_out)``
  per example; with one token this is ``||a_i||^2 ||b_i||^2``, and when
  ``token^2 > d_in * d_out`` building ``G_i`` itself is cheaper;
- ``<sum_t b_it, r>`` and ``||sum_t b_it||^2`` for the bias.

(Goodfellow 2015 for norms; Li et al. 2021, "ghost clipping", for sequences.)
None of this builds the ``example x parameter`` matrix. The inputs come from
:func:`capture_linear`, forward hooks that live only inside a ``with`` block.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(3, 2, 4), torch.randn(3, 2, 5)  # (example, token, d_in / d_out)
    >>> ref = {"weight": torch.randn(5, 4), "bias": torch.randn(5)}
    >>> dots, sq_norms = linear_dots(a, b, ["weight", "bias"], ref)
    >>> g = einsum(b, a, "e t o, e t i -> e o i")  # G_i, built here only to check
    >>> torch.allclose(dots["weight"], (g * ref["weight"]).sum(dim=(1, 2)), atol=1e-5)
    True
    >>> torch.allclose(sq_norms["weight"], g.pow(2).sum(dim=(1, 2)), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from einops import einsum
from torch import Tensor, nn


@dataclass
class Capture:
    """What one linear layer saw during the forward pass."""

    calls: int = 0
    activations: Tensor | None = None
    outputs: Tensor | None = None
    names: list[str] = field(default_factory=list)


@contextmanager
def capture_linear(model: nn.Module, wanted: Collection[str]) -> Iterator[dict[str, Capture]]:
    """Record inputs and outputs of the linear layers owning ``wanted`` params.

    Which axis holds the examples, and whether the layer may be treated per
    example at all, is not decided here but by :mod:`gradlens._ghost_plan`.
    Hooks live only inside the ``with`` block and are removed even on error.
    """
    captures: dict[str, Capture] = {}
    handles = []

    def make_hook(capture: Capture) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            capture.calls += 1
            capture.activations = args[0].detach()
            capture.outputs = output

        return hook

    for module_name, module in model.named_modules():
        if not is_plain_linear(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        names = [prefix + p for p, _ in module.named_parameters(recurse=False)]
        names = [n for n in names if n in wanted]
        if names:
            captures[module_name] = Capture(names=names)
            handles.append(module.register_forward_hook(make_hook(captures[module_name])))
    try:
        yield captures
    finally:
        for handle in handles:
            handle.remove()


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a subclass that keeps its ``forward`` (``out_proj`` of attention)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def as_tokens(x: Tensor, example_axis: int) -> Tensor:
    """Bring a linear input or output to ``(example, token, d)``.

    Args:
        x: Shape ``(..., d)`` with the examples along ``example_axis`` (not the last).
        example_axis: The axis established by the plan.

    Returns:
        Shape ``(example, token, d)``, ``token`` the product of the other
        axes (1 for ``(example, d)``); a view when ``example_axis`` is 0.
    """
    x = x.movedim(example_axis, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def linear_dots(
    a: Tensor, b: Tensor, names: list[str], reference: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Ghost inner products and squared norms of one linear layer's parameters.

    Args:
        a: Input activations, shape ``(example, token, d_in)``.
        b: Gradients of each example's loss w.r.t. the outputs, ``(example, token, d_out)``.
        names: The layer's selected parameter names (``*.weight`` and/or ``*.bias``).
        reference: Reference gradient holding those names.

    Returns:
        ``(dots, sq_norms)``, each name -> shape ``(example,)``.
    """
    dots: dict[str, Tensor] = {}
    sq_norms: dict[str, Tensor] = {}
    tokens, d_in, d_out = a.shape[1], a.shape[2], b.shape[2]
    for name in names:
        if name.endswith("bias"):
            summed = b.sum(dim=1)
            dots[name] = summed @ reference[name]
            sq_norms[name] = _sq_rows(summed.unsqueeze(1))
            continue
        dots[name] = _bilinear(a, b, reference[name])
        if tokens == 1:
            sq_norms[name] = _sq_rows(a) * _sq_rows(b)
        elif tokens * tokens <= d_in * d_out:
            gram_a = einsum(a, a, "e t i, e s i -> e t s")
            gram_b = einsum(b, b, "e t o, e s o -> e t s")
            sq_norms[name] = (gram_a * gram_b).sum(dim=(1, 2))
        else:
            sq_norms[name] = _sq_rows(einsum(b, a, "e t o, e t i -> e o i"))
    return dots, sq_norms


def _sq_rows(x: Tensor) -> Tensor:
    """Squared norm of each example's slice, ``(example, ...) -> (example,)``, no temporaries."""
    return torch.linalg.vector_norm(x.flatten(start_dim=1), dim=1).square()


def _bilinear(a: Tensor, b: Tensor, weight_ref: Tensor) -> Tensor:
    """``sum_t b_it^T R a_it`` per example, projecting the wider side through ``R``.

    ``a @ R^T`` has ``d_out`` columns and ``b @ R`` has ``d_in``; the smaller
    product costs the same matmul but a smaller temporary and elementwise pass.
    """
    if b.shape[2] <= a.shape[2]:
        return ((a @ weight_ref.T) * b).sum(dim=(1, 2))
    return ((b @ weight_ref) * a).sum(dim=(1, 2))
