"""Ghost forms of ``F.linear`` and HF ``Conv1D`` (``torch.addmm``), and their core (private).

A linear map ``z = a W^T + c`` sees, for example ``i``, input rows ``a_it``
(``token`` rows per example, 1 for a 2-D input) and output gradients
``b_it = dloss_i / dz_it``. Backpropagating the *sum* of the per-example losses
gives exactly these ``b_it``, as example ``i``'s rows reach only loss ``i`` (the
plan checks that the forward does not mix examples). Example ``i``'s gradients
are ``G_i = sum_t b_it a_it^T`` and ``sum_t b_it``, and for a reference ``R``:

- ``<G_i, R> = sum_t b_it^T R a_it``, one matmul per reference;
- ``||G_i||^2 = sum_{t,s} (a_it . a_is)(b_it . b_is)``, the product of the
  token Gram matrices, ``token^2 (d_in + d_out)`` per example; when
  ``token^2 > d_in d_out`` building ``G_i`` is cheaper, and is done instead.

(Goodfellow 2015 for norms; Li et al. 2021, "ghost clipping", for sequences.)
:func:`grouped_dots` does this for ``group`` independent blocks at once, which
is also the core of grouped convolution (:mod:`gradlens.probes.forms.conv`).

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 5)  # (example, group, token, d)
    >>> refs = torch.randn(2, 1, 5, 4)  # (reference, group, d_out, d_in)
    >>> dots, sq_norms = grouped_dots(a, b, refs)
    >>> g = einsum(b, a, "e g t o, e g t i -> e g o i")  # G_i, built here only to check
    >>> torch.allclose(dots[:, 1], (g * refs[1]).sum(dim=(1, 2, 3)), atol=1e-5)
    True
    >>> torch.allclose(sq_norms, g.pow(2).sum(dim=(1, 2, 3)), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import einsum
from torch import Tensor

from gradlens.probes.forms.base import Call, Form, Layout, Results, argument, to_examples
from gradlens.probes.forms.shared import Materialised, Outer

__all__ = ["ADDMM", "LINEAR", "grouped_dots"]

_CHUNK_ELEMENTS = 2**24
"""Largest temporary (in elements) the squared-norm forms build at once."""


def grouped_dots(a: Tensor, b: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """Dots and squared norms of ``G_ig = sum_t b_igt a_igt^T`` over groups ``g``.

    With one token, or ``token^2 <= d_in d_out``, the dots are ``sum_t b^T R a``
    and the norms the Gram form; otherwise ``G_i`` is built, a chunk of
    examples at a time, and gives both.

    Args:
        a: Input rows, shape ``(example, group, token, d_in)``.
        b: Output gradients, shape ``(example, group, token, d_out)``.
        references: Shape ``(reference, group, d_out, d_in)``.

    Returns:
        ``(dots (example, reference), sq_norms (example,))``; ``G_i`` is never
        built for all examples at once.
    """
    groups, tokens, d_in, d_out = a.shape[1], a.shape[2], a.shape[3], b.shape[3]
    if tokens > 1 and tokens * tokens > d_in * d_out:
        flat_refs = references.reshape(references.shape[0], -1).T
        step = max(1, _CHUNK_ELEMENTS // max(groups * d_in * d_out, 1))
        dots, sq_norms = [], []
        for start in range(0, a.shape[0], step):
            x, y = a[start : start + step], b[start : start + step]
            g = einsum(y, x, "e g t o, e g t i -> e g o i").flatten(start_dim=1)
            dots.append(g @ flat_refs)
            sq_norms.append(g.square().sum(dim=1))
        return torch.cat(dots), torch.cat(sq_norms)
    found = [
        ((a @ r.transpose(-1, -2)) * b).sum(dim=(1, 2, 3))
        if d_out <= d_in
        else ((b @ r) * a).sum(dim=(1, 2, 3))
        for r in references
    ]
    dots_k = torch.stack(found, dim=1) if found else a.new_zeros(a.shape[0], 0)
    if tokens == 1:
        return dots_k, (a.square().sum(dim=-1) * b.square().sum(dim=-1)).sum(dim=(1, 2))
    step = max(1, _CHUNK_ELEMENTS // max(groups * tokens * tokens, 1))
    parts = []
    for start in range(0, a.shape[0], step):
        x, y = a[start : start + step], b[start : start + step]
        gram_a = einsum(x, x, "e g t i, e g s i -> e g t s")
        gram_b = einsum(y, y, "e g t o, e g s o -> e g t s")
        parts.append((gram_a * gram_b).sum(dim=(1, 2, 3)))
    return dots_k, torch.cat(parts)


def bias_results(b: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """Dots and squared norms of per-example bias gradients ``b``, ``(example, *bias)``."""
    flat = b.flatten(start_dim=1)
    return flat @ references.reshape(references.shape[0], -1).T, flat.square().sum(dim=1)


def _bind_linear(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``F.linear(input, weight, bias=None)``."""
    x = argument(args, kwargs, 0, "input", None)
    weight = argument(args, kwargs, 1, "weight", None)
    bias = argument(args, kwargs, 2, "bias", None)
    if x.ndim < 2:
        return "F.linear on an input without a batch axis"
    return Call(x, {"weight": weight, "bias": bias}, {"last_axis": x.ndim - 2})


def _compute_linear(
    call: Call, grad_output: Tensor, layout: Layout, references: Mapping[str, Tensor]
) -> Results:
    """``F.linear``: weight ``(d_out, d_in)`` and bias ``(d_out,)``."""
    batch = call.input.shape[layout.axis] // layout.rows
    a = to_examples(call.input, layout, batch)
    b = to_examples(grad_output, layout, batch)
    a = a.reshape(batch, 1, -1, a.shape[-1])
    b = b.reshape(batch, 1, -1, b.shape[-1])
    found: Results = {}
    if "weight" in references:
        found["weight"] = grouped_dots(a, b, references["weight"].unsqueeze(1))
    if "bias" in references:
        found["bias"] = bias_results(b.sum(dim=(1, 2)), references["bias"])
    return found


def _linear_rows(call: Call, grad_output: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """Input and output-gradient rows, ``(example, token, d_in)`` and ``(..., d_out)``."""
    batch = call.input.shape[layout.axis] // layout.rows
    a = to_examples(call.input.detach(), layout, batch)
    b = to_examples(grad_output, layout, batch)
    return a.reshape(batch, -1, a.shape[-1]), b.reshape(batch, -1, b.shape[-1])


def _parts_linear(call: Call, grad_output: Tensor, layout: Layout) -> dict[str, Any]:
    """``F.linear``: ``G = sum_t b_t a_t^T``, bias ``sum_t b_t``."""
    a, b = _linear_rows(call, grad_output, layout)
    return {"weight": Outer(b, None, a), "bias": Materialised(b.sum(dim=1))}


def _parts_addmm(call: Call, grad_output: Tensor, layout: Layout) -> dict[str, Any]:
    """HF ``Conv1D``: ``G = sum_t a_t b_t^T`` (the weight is stored ``(d_in, d_out)``)."""
    a, b = _linear_rows(call, grad_output, layout)
    return {"weight": Outer(a, None, b), "bias": Materialised(b.sum(dim=1))}


def _bind_addmm(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``torch.addmm(bias, input, weight)`` with ``weight (d_in, d_out)``, as in HF ``Conv1D``."""
    bias = argument(args, kwargs, 0, "input", None)
    x = argument(args, kwargs, 1, "mat1", None)
    weight = argument(args, kwargs, 2, "mat2", None)
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        return "torch.addmm with beta or alpha other than 1"
    if bias is None or bias.ndim != 1:
        return "torch.addmm whose added term is not a bias vector"
    return Call(x, {"weight": weight, "bias": bias}, {"last_axis": 0})


def _compute_addmm(
    call: Call, grad_output: Tensor, layout: Layout, references: Mapping[str, Tensor]
) -> Results:
    """HF ``Conv1D``: a linear map whose weight is stored transposed, ``(d_in, d_out)``."""
    transposed = {r: (t.transpose(-1, -2) if r == "weight" else t) for r, t in references.items()}
    return _compute_linear(call, grad_output, layout, transposed)


_SHARED = {"weight": "outer", "bias": "materialised"}
LINEAR = Form(
    "F.linear", (torch._C._nn.linear,), _bind_linear, _compute_linear, _parts_linear, _SHARED
)
ADDMM = Form("torch.addmm", (torch.addmm,), _bind_addmm, _compute_addmm, _parts_addmm, _SHARED)
