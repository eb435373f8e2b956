"""The experiment's MLPs as a core :class:`~gradlens.training.Stack`.

A *stack* here is a ``dict[str, Tensor]`` keyed like :func:`init_mlp`'s
``named_parameters()`` (``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ...), each
tensor with a leading ``model`` axis, as the original code's ``MultiLinear``
holds its models. :func:`mlp_stack` hands it to gradlens's stacked step and
forward (one batched matmul per layer); nothing here computes a probe.

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
from functools import cache

import torch
from torch import Tensor, nn

from gradlens.training import Stack, unstack
from gradlens.training import stack_forward as core_forward
from subliminal_mnist.models import init_mlp

__all__ = ["init_stack", "mlp_stack", "model_params", "model_view", "sizes_of", "stack_forward"]


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


def sizes_of(stack: Mapping[str, Tensor]) -> tuple[int, ...]:
    """The layer widths of a stack, input first."""
    weights = [v for n, v in stack.items() if n.endswith(".weight")]
    return (weights[0].shape[2], *(w.shape[1] for w in weights))


@cache
def _architecture(sizes: tuple[int, ...]) -> nn.Module:
    return init_mlp(sizes, seed=0).to("meta")


def mlp_stack(stack: Mapping[str, Tensor]) -> Stack:
    """The stack as a core :class:`~gradlens.training.Stack` (sharing its tensors)."""
    return Stack(_architecture(sizes_of(stack)), dict(stack), {})


def stack_forward(stack: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Every model's logits.

    Args:
        stack: The stacked parameters.
        x: Inputs shared by all models, ``(example, pixel)``, or one batch per
            model, ``(model, example, pixel)``.

    Returns:
        ``(model, example, logit)``.
    """
    models = next(iter(stack.values())).shape[0]
    if x.ndim == 2:
        x = x.expand(models, *x.shape)
    return core_forward(mlp_stack(stack), x)


def model_params(stack: Mapping[str, Tensor], model: int) -> dict[str, Tensor]:
    """One model's parameters (views of the stack)."""
    return {name: value[model] for name, value in stack.items()}


def model_view(stack: Mapping[str, Tensor], model: int) -> nn.Module:
    """One model of the stack as an :func:`init_mlp` module (a copy of its parameters)."""
    return unstack(mlp_stack(stack), model)
