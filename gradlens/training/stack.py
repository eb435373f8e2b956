"""Many models of one architecture, their parameters stacked along a leading ``model`` dim.

A :class:`Stack` holds ``M`` independent models as one set of tensors of
shape ``(model, *shape)`` (as :func:`torch.func.stack_module_state` builds
them) and the architecture as a module whose own parameters are not used. A
loss summed over models gives each model its own gradient (the models share
no parameter), and an elementwise optimizer (Adam, SGD) on the stacked
tensors updates each model exactly as if it were trained alone.

The forward is ``vmap`` over the models of ``functional_call``, or, for an
MLP (an ``nn.Sequential`` of ``nn.Linear`` and parameter-free elementwise
modules), one batched matmul per layer, which :mod:`gradlens.training.stacked`
also uses for exact per-example dots in factored form.

Example:
    >>> import torch
    >>> from torch import nn
    >>> nets = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(5)]
    >>> stack = stack_modules(nets)
    >>> stack.models, tuple(stack.params["0.weight"].shape)
    (5, (5, 3, 4))
    >>> x = torch.randn(5, 7, 4)  # (model, example, feature)
    >>> bool(torch.allclose(stack_forward(stack, x)[2], nets[2](x[2]), atol=1e-6))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from gradlens.probes.outputs import OutputSelector, select_output

__all__ = ["ELEMENTWISE", "Stack", "mlp_layers", "stack_forward", "stack_modules", "unstack"]

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Softplus,
    nn.Identity,
)
"""Parameter-free modules that act on each value alone (no example mixing, no randomness)."""


class Stack(NamedTuple):
    """``M`` models of one architecture as stacked tensors.

    Attributes:
        module: The architecture (one model); its own parameters are not used.
        params: ``name -> (model, ...)`` leaf tensors with ``requires_grad``:
            what the optimizer holds.
        buffers: ``name -> (model, ...)``.
    """

    module: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]

    @property
    def models(self) -> int:
        """The number of models."""
        return next(iter(self.params.values())).shape[0]


def stack_modules(modules: Sequence[nn.Module]) -> Stack:
    """Stack models of one architecture (copies: the modules are left as they are).

    Args:
        modules: At least one model, all of the same architecture.

    Returns:
        A :class:`Stack` whose ``params`` are new leaves that require grad.

    Raises:
        ValueError: For no models, or models whose parameters differ in names or shapes.
    """
    if not modules:
        raise ValueError("stack_modules needs at least one model.")
    first = {n: p.shape for n, p in modules[0].named_parameters()}
    for i, m in enumerate(modules[1:], start=1):
        found = {n: p.shape for n, p in m.named_parameters()}
        if found != first:
            raise ValueError(
                f"model {i} differs from model 0 in its parameters ({sorted(found)} against "
                f"{sorted(first)}, or their shapes): a stack holds models of one architecture."
            )
    params, buffers = stack_module_state(list(modules))
    template = copy.deepcopy(modules[0]).to("meta")
    return Stack(template, dict(params), dict(buffers))


def unstack(stack: Stack, model: int) -> nn.Module:
    """One model of the stack as an ordinary module, with a copy of its parameters and buffers.

    The copies keep the stack's dtypes and device.
    """
    module = copy.deepcopy(stack.module).to_empty(device=next(iter(stack.params.values())).device)
    state = {
        n: v[model].detach().clone() for n, v in (*stack.params.items(), *stack.buffers.items())
    }
    module.load_state_dict(state, strict=False, assign=True)
    return module


def mlp_layers(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The layers of an MLP (``nn.Sequential`` of ``nn.Linear`` and :data:`ELEMENTWISE`) or None."""
    if not isinstance(module, nn.Sequential) or any(True for _ in module.buffers()):
        return None
    layers = list(module.named_children())
    if not any(isinstance(m, nn.Linear) for _, m in layers):
        return None
    if all(isinstance(m, (nn.Linear, *ELEMENTWISE)) for _, m in layers):
        return layers
    return None


class MLPPass(NamedTuple):
    """A batched-matmul forward of a stacked MLP, with what the factored probes need.

    Attributes:
        outputs: ``(model, example, out)``.
        layer_inputs: Each linear layer's input, ``layer -> (model, example, in)``.
        layer_outputs: Each linear layer's output, ``layer -> (model, example, out)``.
    """

    outputs: Tensor
    layer_inputs: dict[str, Tensor]
    layer_outputs: dict[str, Tensor]


def _linear(weight: Tensor, bias: Tensor | None, h: Tensor) -> Tensor:
    """``h W^T + b`` per model; ``h`` shared by the models (stride 0) takes one einsum."""
    if h.stride(0) == 0:
        z = torch.einsum("moi,bi->mbo", weight, h[0])
        return z if bias is None else z + bias[:, None, :]
    if bias is None:
        return torch.bmm(h, weight.transpose(1, 2))
    return torch.baddbmm(bias[:, None, :], h, weight.transpose(1, 2))


def mlp_pass(
    layers: list[tuple[str, nn.Module]], params: Mapping[str, Tensor], inputs: Tensor
) -> MLPPass:
    """Every model's outputs from one batched matmul per linear layer.

    Args:
        layers: From :func:`mlp_layers`.
        params: The stacked parameters.
        inputs: ``(model, example, in)``; a batch the models share may be an
            ``expand`` of one ``(example, in)`` batch.
    """
    h = inputs
    layer_inputs, layer_outputs = {}, {}
    for name, child in layers:
        if isinstance(child, nn.Linear):
            layer_inputs[name] = h
            h = _linear(params[f"{name}.weight"], params.get(f"{name}.bias"), h)
            layer_outputs[name] = h
        else:
            h = child(h)
    return MLPPass(h, layer_inputs, layer_outputs)


def stack_forward(stack: Stack, inputs: Tensor, *, output: OutputSelector | None = None) -> Tensor:
    """Every model's output on its batch.

    Args:
        stack: The models.
        inputs: ``(model, example, ...)``.
        output: Which tensor of the model's return value to give, as in
            :func:`~gradlens.training.probed_step`.

    Returns:
        ``(model, example, ...)``.
    """
    layers = mlp_layers(stack.module)
    if layers is not None and inputs.ndim == 3:
        return mlp_pass(layers, stack.params, inputs).outputs

    def one(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return select_output(functional_call(stack.module, (params, buffers), (x,)), output)

    return torch.func.vmap(one)(stack.params, stack.buffers, inputs)
