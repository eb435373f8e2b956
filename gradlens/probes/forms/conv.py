"""Ghost forms of ``F.conv1d`` and ``F.conv2d`` by unfolding (private).

A convolution is a linear map applied at every output position ``l``: with
the input unfolded into patches ``u_il`` (``F.unfold``, of length
``in_channels / groups * kernel``), group ``g`` computes ``z_igl = W_g u_igl``.
So example ``i``'s weight gradient is ``G_ig = sum_l b_igl u_igl^T``, a linear
layer's with the output positions as tokens, and
:func:`gradlens.probes.forms.linear.grouped_dots` gives the dots and the squared
norms, choosing per layer between the Gram form (``positions^2 (d_in + d_out)``
per group) and building ``G_ig`` (``positions d_in d_out``). The bias gradient
is ``sum_l b_il``.

Padding: ``nn.Conv1d``/``nn.Conv2d`` with a ``padding_mode`` other than
``"zeros"`` (reflect, replicate, circular) pad with ``F.pad`` *before* calling
the convolution with ``padding=0``, so the input captured here is already
padded and every padding mode is exact; ``padding="same"`` is unfolded from an
explicitly padded input (the extra element on the right, as PyTorch does).
Stride, dilation and groups are passed to ``F.unfold`` and the grouping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.probes.forms.base import Call, Form, Layout, Results, argument, to_examples
from gradlens.probes.forms.linear import bias_results, grouped_dots

__all__ = ["CONV"]


def _pair(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _bind_conv(args: tuple, kwargs: dict[str, Any], dims: int) -> Call | str:
    """``F.conv{dims}d(input, weight, bias, stride, padding, dilation, groups)``."""
    x = argument(args, kwargs, 0, "input", None)
    weight = argument(args, kwargs, 1, "weight", None)
    bias = argument(args, kwargs, 2, "bias", None)
    if x.ndim != dims + 2:
        return f"F.conv{dims}d on an input without a batch axis"
    options = {
        "dims": dims,
        "stride": _pair(argument(args, kwargs, 3, "stride", 1), dims),
        "padding": argument(args, kwargs, 4, "padding", 0),
        "dilation": _pair(argument(args, kwargs, 5, "dilation", 1), dims),
        "groups": int(argument(args, kwargs, 6, "groups", 1)),
        "last_axis": 0,
    }
    return Call(x, {"weight": weight, "bias": bias}, options)


def _patches(x: Tensor, kernel: tuple[int, ...], options: dict[str, Any]) -> Tensor:
    """Unfolded patches ``(rows, in_channels * kernel, positions)`` of a conv input."""
    dims, dilation, stride, padding = (
        options["dims"],
        options["dilation"],
        options["stride"],
        options["padding"],
    )
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":
        pad: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
        x = F.pad(x, pad)
        padding = (0,) * dims
    padding = _pair(padding, dims)
    if dims == 1:  # a 1-D convolution is a 2-D one of height 1
        x = x.unsqueeze(-2)
        kernel, dilation, stride, padding = (
            (1, *kernel),
            (1, *dilation),
            (1, *stride),
            (0, *padding),
        )
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def _compute_conv(
    call: Call, grad_output: Tensor, layout: Layout, references: Mapping[str, Tensor]
) -> Results:
    """Per-example dots and norms of a convolution's weight and bias."""
    weight = call.params["weight"]
    assert weight is not None
    groups = call.options["groups"]
    out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
    rows = call.input.shape[0]
    batch = rows // layout.rows
    with torch.no_grad():
        u = _patches(call.input.detach(), kernel, call.options)  # (rows, c_in k, positions)
    u = u.reshape(rows, groups, -1, u.shape[-1]).transpose(-1, -2)
    b = grad_output.reshape(rows, groups, out_channels // groups, -1).transpose(-1, -2)
    if u.shape[2] != b.shape[2]:
        raise RuntimeError(f"unfolded {u.shape[2]} positions, the convolution gave {b.shape[2]}")
    # (rows, group, position, d) -> (example, group, rows per example * position, d)
    u = to_examples(u, layout, batch).transpose(1, 2).flatten(2, 3)
    b = to_examples(b, layout, batch).transpose(1, 2).flatten(2, 3)
    found: Results = {}
    if "weight" in references:
        refs = references["weight"].reshape(-1, groups, out_channels // groups, u.shape[-1])
        found["weight"] = grouped_dots(u, b, refs)
    if "bias" in references:
        found["bias"] = bias_results(b.sum(dim=2).flatten(start_dim=1), references["bias"])
    return found


CONV = (
    Form("F.conv1d", (torch.conv1d,), lambda a, k: _bind_conv(a, k, 1), _compute_conv),
    Form("F.conv2d", (torch.conv2d,), lambda a, k: _bind_conv(a, k, 2), _compute_conv),
)
