"""Many MLPs at once: parameters stacked along a leading ``model`` dim.

A *stack* is a ``dict[str, Tensor]`` keyed like :func:`~subliminal_mnist.init_mlp`'s
``named_parameters()`` (``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ...), each
tensor with a leading ``model`` axis. The forward pass is one batched matmul per
layer, as in the original code's ``MultiLinear``; a loss summed over models gives
every model its own gradient (the models share no parameter), and an elementwise
optimizer (Adam, SGD) on the stacked tensors updates each model exactly as if it
were trained alone.

Example:
    >>> stack = init_stack((4, 3, 2), seeds=[0, 1])
    >>> [tuple(p.shape) for p in stack.values()]
    [(2, 3, 4), (2, 3), (2, 2, 3), (2, 2)]
    >>> single = dict(init_mlp((4, 3, 2), seed=1).named_parameters())
    >>> bool(torch.equal(stack["0.weight"][1], single["0.weight"]))
    True
    >>> x = torch.randn(5, 4)
    >>> bool(torch.allclose(stack_forward(stack, x)[1], model_view(stack, 1)(x)))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gradlens.gradops import group_by_layer
from subliminal_mnist.models import init_mlp

__all__ = [
    "Activations",
    "init_stack",
    "model_dot",
    "model_layer_dot",
    "model_view",
    "stack_forward",
    "stack_forward_cached",
    "unstack",
]


def init_stack(sizes: Sequence[int], seeds: Sequence[int]) -> dict[str, Tensor]:
    """Stack the initialisations :func:`init_mlp` gives for ``seeds``, one model each.

    Args:
        sizes: Layer widths, input first.
        seeds: One initialisation seed per model.

    Returns:
        ``name -> (model, ...)`` float32 tensors (plain tensors, not parameters).
    """
    if not seeds:
        raise ValueError("seeds must name at least one model.")
    models = [dict(init_mlp(sizes, seed=s).named_parameters()) for s in seeds]
    return {name: torch.stack([m[name].detach() for m in models]) for name in models[0]}


def _linear_names(stack: Mapping[str, Tensor]) -> list[str]:
    layers = list(group_by_layer(stack))
    for layer in layers:
        if f"{layer}.weight" not in stack or f"{layer}.bias" not in stack:
            raise ValueError(f"stack layer {layer!r} needs both {layer}.weight and {layer}.bias.")
    return layers


def _linear(stack: Mapping[str, Tensor], layer: str, x: Tensor) -> Tensor:
    weight, bias = stack[f"{layer}.weight"], stack[f"{layer}.bias"]
    if x.ndim == 2:  # one input batch shared by every model
        return torch.einsum("moi,bi->mbo", weight, x) + bias[:, None, :]
    return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))


def stack_forward(stack: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Every model's logits.

    Args:
        stack: The stacked parameters.
        x: Inputs shared by all models, ``(example, pixel)``, or one batch per
            model, ``(model, example, pixel)``.

    Returns:
        ``(model, example, logit)``.
    """
    return stack_forward_cached(stack, x).logits


class Activations(NamedTuple):
    """A forward pass with what the per-example probes need.

    Attributes:
        logits: ``(model, example, logit)``.
        inputs: Each linear layer's input, ``layer -> (model, example, in)``.
        outputs: Each linear layer's output (pre-activation), ``layer -> (model, example, out)``.
    """

    logits: Tensor
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


def stack_forward_cached(stack: Mapping[str, Tensor], x: Tensor) -> Activations:
    """:func:`stack_forward`, keeping every linear layer's input and output."""
    layers = _linear_names(stack)
    inputs, outputs = {}, {}
    h = x
    for i, layer in enumerate(layers):
        if h.ndim == 2:
            h = h.expand(stack[f"{layer}.weight"].shape[0], *h.shape)
        inputs[layer] = h
        z = _linear(stack, layer, h)
        outputs[layer] = z
        h = torch.relu(z) if i < len(layers) - 1 else z
    return Activations(h, inputs, outputs)


def unstack(stack: Mapping[str, Tensor], model: int) -> dict[str, Tensor]:
    """One model's parameters (views of the stack)."""
    return {name: value[model] for name, value in stack.items()}


def model_view(stack: Mapping[str, Tensor], model: int) -> nn.Sequential:
    """One model of the stack as an :func:`init_mlp` module sharing the stack's memory.

    Its parameters are views of the stack (detached, with ``requires_grad``),
    so single-model tools such as :func:`gradlens.probe_batch` see exactly
    that model.
    """
    layers = _linear_names(stack)
    sizes = [stack[f"{layers[0]}.weight"].shape[2]]
    sizes += [stack[f"{layer}.weight"].shape[1] for layer in layers]
    net = init_mlp(sizes, seed=0)
    for name, value in unstack(stack, model).items():
        module, attr = name.rsplit(".", 1)
        setattr(net.get_submodule(module), attr, nn.Parameter(value.detach()))
    return net.to(next(iter(stack.values())).dtype)


def _vecdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def model_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``<a_m, b_m>`` for every model, shape ``(model,)``."""
    return sum(_vecdot(a[n], b[n]) for n in a)  # type: ignore[return-value]


def model_layer_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``<a_m, b_m>`` per model and layer, shape ``(model, layer)``, layers in parameter order."""
    groups = group_by_layer(a)
    return torch.stack(
        [sum(_vecdot(a[n], b[n]) for n in names) for names in groups.values()],
        dim=1,
    )
