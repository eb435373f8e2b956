"""Ghost forms of the affine parameters of normalisations (private).

A normalisation ``z = x_hat * w + c`` (LayerNorm, RMSNorm, GroupNorm,
InstanceNorm, eval-mode BatchNorm) is linear in its weight ``w`` and bias
``c``, per channel. Example ``i``'s gradients are the sums over every axis but
the channel axes of ``b_i * x_hat_i`` and of ``b_i``, where ``x_hat`` is
recomputed from the captured input by the same function without its affine
parameters (the same ``eps``, statistics per example or the running ones), and
``b`` is the output gradient. These have only ``channel`` entries per example,
so they are built, and the dots and norms taken from them exactly.

Train-mode BatchNorm (statistics over the batch) mixes examples: it is refused
before any plan (``check_vmap_compatible``), and ``F.batch_norm`` with
``training=True`` has no form here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.probes.forms.base import (
    Call,
    Form,
    Layout,
    Results,
    argument,
    from_materialised,
    to_examples,
)
from gradlens.probes.forms.shared import Materialised

__all__ = ["NORMS"]


def _bind_layer_norm(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``F.layer_norm(input, normalized_shape, weight, bias, eps)``."""
    x = argument(args, kwargs, 0, "input", None)
    shape = tuple(argument(args, kwargs, 1, "normalized_shape", None))
    eps = argument(args, kwargs, 4, "eps", 1e-5)
    params = {"weight": argument(args, kwargs, 2, "weight", None)}
    params["bias"] = argument(args, kwargs, 3, "bias", None)

    def normalise(t: Tensor) -> Tensor:
        return F.layer_norm(t, shape, None, None, eps)

    return _channels_last(x, params, len(shape), normalise, "F.layer_norm")


def _bind_rms_norm(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``F.rms_norm(input, normalized_shape, weight, eps)``."""
    x = argument(args, kwargs, 0, "input", None)
    shape = tuple(argument(args, kwargs, 1, "normalized_shape", None))
    eps = argument(args, kwargs, 3, "eps", None)

    def normalise(t: Tensor) -> Tensor:
        return F.rms_norm(t, shape, None, eps)

    weight = argument(args, kwargs, 2, "weight", None)
    return _channels_last(x, {"weight": weight}, len(shape), normalise, "F.rms_norm")


def _channels_last(
    x: Tensor,
    params: dict[str, Tensor | None],
    channel_dims: int,
    normalise: Callable[[Tensor], Tensor],
    what: str,
) -> Call | str:
    """A call whose trailing ``channel_dims`` axes are the parameter's shape."""
    if x.ndim <= channel_dims:
        return f"{what} on an input without a batch axis"
    options = {"normalise": normalise, "channel_axis": None, "last_axis": x.ndim - channel_dims - 1}
    return Call(x, params, options)


def _bind_group_norm(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``F.group_norm(input, num_groups, weight, bias, eps)``."""
    x = argument(args, kwargs, 0, "input", None)
    groups = argument(args, kwargs, 1, "num_groups", None)
    eps = argument(args, kwargs, 4, "eps", 1e-5)

    def normalise(t: Tensor) -> Tensor:
        return F.group_norm(t, groups, None, None, eps)

    params = {"weight": argument(args, kwargs, 2, "weight", None)}
    params["bias"] = argument(args, kwargs, 3, "bias", None)
    return _channels_first(x, params, normalise, "F.group_norm")


def _bind_instance_norm(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, ...)``."""
    x = argument(args, kwargs, 0, "input", None)
    mean = argument(args, kwargs, 1, "running_mean", None)
    var = argument(args, kwargs, 2, "running_var", None)
    per_example = argument(args, kwargs, 5, "use_input_stats", True)
    eps = argument(args, kwargs, 7, "eps", 1e-5)
    if not per_example and (mean is None or var is None):
        return "F.instance_norm without input statistics or running statistics"
    if not per_example:
        mean, var = mean.detach().clone(), var.detach().clone()

    def normalise(t: Tensor) -> Tensor:
        if per_example:  # no running statistics: nothing is updated
            return F.instance_norm(t, None, None, None, None, True, 0.0, eps)
        return F.instance_norm(t, mean, var, None, None, False, 0.0, eps)

    params = {"weight": argument(args, kwargs, 3, "weight", None)}
    params["bias"] = argument(args, kwargs, 4, "bias", None)
    return _channels_first(x, params, normalise, "F.instance_norm")


def _bind_batch_norm(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)``."""
    x = argument(args, kwargs, 0, "input", None)
    mean = argument(args, kwargs, 1, "running_mean", None)
    var = argument(args, kwargs, 2, "running_var", None)
    eps = argument(args, kwargs, 7, "eps", 1e-5)
    if argument(args, kwargs, 5, "training", False) or mean is None or var is None:
        return "F.batch_norm with batch statistics (training mode) mixes examples"
    mean, var = mean.detach().clone(), var.detach().clone()

    def normalise(t: Tensor) -> Tensor:
        return F.batch_norm(t, mean, var, None, None, False, 0.0, eps)

    params = {"weight": argument(args, kwargs, 3, "weight", None)}
    params["bias"] = argument(args, kwargs, 4, "bias", None)
    return _channels_first(x, params, normalise, "F.batch_norm")


def _channels_first(
    x: Tensor,
    params: dict[str, Tensor | None],
    normalise: Callable[[Tensor], Tensor],
    what: str,
) -> Call | str:
    """A call on ``(example, channel, ...)`` whose parameters have shape ``(channel,)``."""
    if x.ndim < 2:
        return f"{what} on an input without a batch axis"
    return Call(x, params, {"normalise": normalise, "channel_axis": 1, "last_axis": 0})


def _parts_norm(call: Call, grad_output: Tensor, layout: Layout) -> dict[str, Any]:
    """Per-example affine gradients, built: they have ``channel`` entries."""
    batch = call.input.shape[layout.axis] // layout.rows
    with torch.no_grad():
        x_hat = call.options["normalise"](call.input.detach())
    # (example, rows, *other axes); the parameters' axes are the trailing ones
    # (LayerNorm, RMSNorm) or the channel axis (axis 1 of the input, 2 here).
    b = to_examples(grad_output, layout, batch)
    x_hat = to_examples(x_hat, layout, batch)
    if call.options["channel_axis"] is not None:
        b, x_hat = b.movedim(2, -1), x_hat.movedim(2, -1)
    param = next(p for p in call.params.values() if p is not None)
    summed = tuple(range(1, b.ndim - param.ndim))
    return {
        "weight": Materialised((b * x_hat).sum(dim=summed)),
        "bias": Materialised(b.sum(dim=summed)),
    }


def _compute_norm(
    call: Call, grad_output: Tensor, layout: Layout, references: Mapping[str, Tensor]
) -> Results:
    """Dots and norms from the built per-example affine gradients."""
    parts = _parts_norm(call, grad_output, layout)
    return {role: from_materialised(parts[role].grads, refs) for role, refs in references.items()}


_SHARED = {"weight": "materialised", "bias": "materialised"}
NORMS = (
    Form("F.layer_norm", (F.layer_norm,), _bind_layer_norm, _compute_norm, _parts_norm, _SHARED),
    Form("F.rms_norm", (F.rms_norm,), _bind_rms_norm, _compute_norm, _parts_norm, _SHARED),
    Form("F.group_norm", (F.group_norm,), _bind_group_norm, _compute_norm, _parts_norm, _SHARED),
    Form(
        "F.instance_norm",
        (F.instance_norm,),
        _bind_instance_norm,
        _compute_norm,
        _parts_norm,
        _SHARED,
    ),
    Form("F.batch_norm", (F.batch_norm,), _bind_batch_norm, _compute_norm, _parts_norm, _SHARED),
)
