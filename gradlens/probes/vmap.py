"""Per-example gradients with ``torch.func``.

The loss is written for a batch, as in ordinary training code. For the
per-example path it is called on a batch of one, inside ``vmap(grad(...))``,
so ``per_example_grads(...)[name][i]`` is the gradient of
``loss_fn(model(inputs[i:i+1]), *(t[i:i+1] for t in targets))``.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    >>> grads = per_example_grads(model, torch.nn.functional.cross_entropy, x, y)
    >>> tuple(grads["weight"].shape)
    (5, 2, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from gradlens.errors import UnsupportedModelError
from gradlens.probes.batch import Inputs, call, examples, take, unsqueeze
from gradlens.probes.checks import (
    LossFn,
    Randomness,
    check_batch,
    check_chunk_size,
    check_vmap_compatible,
    explain_vmap_failures,
    split_params,
)
from gradlens.probes.loop import check_loop_randomness, loop_grads, loop_reason
from gradlens.probes.outputs import OutputSelector, plain_forward, select_output

__all__ = [
    "LossFn",
    "Randomness",
    "check_batch",
    "check_chunk_size",
    "check_vmap_compatible",
    "loss_and_grad",
    "mean_grad",
    "per_example_grads",
    "per_example_losses",
    "split_params",
]


def _one_example_loss(
    model: nn.Module,
    loss_fn: LossFn,
    frozen: dict[str, Tensor],
    buffers: dict[str, Tensor],
    output: OutputSelector | None = None,
) -> Callable[..., Tensor]:
    """Build ``loss(params, x, *targets)`` for one example, fed as a batch of one."""

    def loss(params: dict[str, Tensor], x: Inputs, *targets: Tensor) -> Tensor:
        found = call(model, (params, frozen, buffers), unsqueeze(x))
        return loss_fn(select_output(found, output), *(t.unsqueeze(0) for t in targets))

    return loss


def per_example_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    *targets: Tensor,
    params: Collection[str] | None = None,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    output: OutputSelector | None = None,
) -> dict[str, Tensor]:
    """Compute the gradient of the loss of every example separately.

    Uses ``vmap(grad(loss))`` over ``functional_call``; the model's own
    parameters are read, never changed, and buffers pass through unchanged.
    A model with a fused recurrent module (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``,
    packed sequences or not), and a forward under ``torch.autocast`` that
    ``vmap`` fails on, take ``grad(loss)`` one example at a time instead
    (:mod:`gradlens.probes.loop`: exact, ``example`` passes of one example).

    Args:
        model: The model; BatchNorm must be in eval mode.
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch.
        inputs: Shape ``(example, ...)``.
        *targets: Each of shape ``(example, ...)``.
        params: Parameter names to differentiate; default all that require grad.
        chunk_size: Examples per vmap chunk, to bound memory; ``None`` does all at once.
        randomness: ``torch.func.vmap``'s choice for random ops such as dropout.
        output: Which tensor of the model's return value the loss sees, when
            the model returns a ``ModelOutput``, dict or tuple: a key or
            attribute name (``"logits"``), a tuple index, or a callable
            ``output(model_output) -> Tensor``; ``None`` if it returns a
            tensor. ``config.use_cache`` is switched off during the call.

    Returns:
        For every selected name, shape ``(example, *param.shape)`` (``(0,
        *param.shape)`` for a batch without examples).

    Raises:
        UnsupportedModelError: If the model cannot be batched per example.
        ValueError: If ``chunk_size`` is zero or negative, a target's first dim
            differs from the number of examples, or ``loss_fn`` does not
            return a scalar.
    """
    check_chunk_size(chunk_size)
    check_batch(inputs, targets)
    check_vmap_compatible(model, randomness)
    selected, frozen = split_params(model, params)
    if examples(inputs) == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in selected.items()}
    buffers = dict(model.named_buffers())
    loss = _one_example_loss(model, loss_fn, frozen, buffers, output)
    if loop_reason(model) is not None:  # fused RNN kernels, packed sequences
        check_loop_randomness(model, randomness)
        with plain_forward(model):
            return loop_grads(loss, selected, inputs, targets, examples(inputs), randomness)
    try:
        return _vmapped(loss, selected, inputs, targets, chunk_size, randomness, model)
    except UnsupportedModelError as err:
        if not _vmap_failed_under_autocast(err, selected):
            raise
    with plain_forward(model):  # vmap's batching rules meet autocast's mixed dtypes
        return loop_grads(loss, selected, inputs, targets, examples(inputs), randomness)


def _vmap_failed_under_autocast(err: UnsupportedModelError, params: dict[str, Tensor]) -> bool:
    """Whether vmap failed, while one example ran, under autocast (not for random draws)."""
    cause = err.__cause__
    if not isinstance(cause, RuntimeError) or "random" in str(cause):
        return False
    return any(torch.is_autocast_enabled(k) for k in {p.device.type for p in params.values()})


def _vmapped(
    loss: Callable[..., Tensor],
    selected: dict[str, Tensor],
    inputs: Inputs,
    targets: tuple[Tensor, ...],
    chunk_size: int | None,
    randomness: Randomness,
    model: nn.Module,
) -> dict[str, Tensor]:
    """``vmap(grad(loss))`` chunk by chunk, vmap-only failures explained."""
    in_dims = (None, 0, *([0] * len(targets)))
    batched = vmap(grad(loss), in_dims=in_dims, randomness=randomness)
    count = examples(inputs)
    step = chunk_size or count
    result: dict[str, Tensor] = {}

    def plain() -> Tensor:
        return loss(selected, take(inputs, 0), *(t[0] for t in targets))

    with plain_forward(model), explain_vmap_failures(model, plain):
        # Chunks are written into one preallocated result: vmap's own chunk_size
        # concatenates them at the end, which doubles the peak memory.
        for start in range(0, count, step):
            part = slice(start, start + step)
            grads = batched(selected, take(inputs, part), *(t[part] for t in targets))
            if step == count:
                return grads
            for name, g in grads.items():
                if name not in result:
                    result[name] = g.new_empty((count, *g.shape[1:]))
                result[name][part] = g
    return result


def per_example_losses(
    loss_fn: LossFn, outputs: object, *targets: Tensor, output: OutputSelector | None = None
) -> Tensor:
    """Evaluate a batch loss on every example of already computed outputs.

    Args:
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch.
        outputs: Shape ``(example, ...)``, or what the model returned if ``output`` is given.
        *targets: Each of shape ``(example, ...)``.
        output: Selector of the tensor in ``outputs``, as in :func:`per_example_grads`.

    Returns:
        Shape ``(example,)``: ``loss_fn`` of each example as a batch of one.

    Raises:
        ValueError: If a target's first dim differs from the number of
            examples, or ``loss_fn`` does not return a scalar.
    """
    selected = select_output(outputs, output)
    check_batch(selected, targets, what="outputs")

    def one(o: Tensor, *t: Tensor) -> Tensor:
        return loss_fn(o.unsqueeze(0), *(ti.unsqueeze(0) for ti in t))

    losses = vmap(one)(selected, *targets)
    if losses.ndim != 1:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(losses.shape[1:])} for one example; it "
            "must return a scalar, the loss of the batch it is given: keep reduction='mean' "
            "(the default of torch's losses) or end it with .mean()."
        )
    return losses


def loss_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    *targets: Tensor,
    params: Collection[str] | None = None,
    output: OutputSelector | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Compute the batch loss and its gradient with one plain backward pass.

    The model's ``.grad`` fields are not touched.

    Args:
        model: The model.
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch.
        inputs: Shape ``(example, ...)``.
        *targets: Each of shape ``(example, ...)``.
        params: Parameter names to differentiate; default all that require grad.
        output: Selector of the tensor the loss sees, as in :func:`per_example_grads`.

    Returns:
        ``(loss, grads)``: the detached loss, shape ``()``, and for every
        selected name a tensor of the parameter's shape.

    Raises:
        UnsupportedModelError: If a selected parameter does not affect the loss.
        ValueError: If a target's first dim differs from the number of
            examples, or ``loss_fn`` does not return a scalar.
    """
    check_batch(inputs, targets)
    selected, frozen = split_params(model, params)
    selected = {name: p.requires_grad_() for name, p in selected.items()}
    buffers = dict(model.named_buffers())
    with torch.enable_grad(), plain_forward(model):
        outputs = call(model, (selected, frozen, buffers), inputs)
        loss = loss_fn(select_output(outputs, output), *targets)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn returned {shape} for a batch; it must return a scalar tensor, the "
                "loss of the batch: keep reduction='mean' (the default of torch's losses) or "
                "end it with .mean()."
            )
        values = torch.autograd.grad(loss, list(selected.values()), allow_unused=True)
    missing = [name for name, value in zip(selected, values, strict=True) if value is None]
    if missing:
        raise UnsupportedModelError(
            f"parameters {missing} do not affect the loss, so they have no gradient. Freeze "
            "them (param.requires_grad_(False)), or leave them out of `params`, to probe the "
            "others."
        )
    return loss.detach(), dict(zip(selected, values, strict=True))


def mean_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    *targets: Tensor,
    params: Collection[str] | None = None,
    output: OutputSelector | None = None,
) -> dict[str, Tensor]:
    """Compute the gradient of the batch loss with one plain backward pass.

    With a mean-reduced ``loss_fn`` this is the mean of
    :func:`per_example_grads`. The model's ``.grad`` fields are not touched.

    Args:
        model: The model.
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch.
        inputs: Shape ``(example, ...)``.
        *targets: Each of shape ``(example, ...)``.
        params: Parameter names to differentiate; default all that require grad.
        output: Selector of the tensor the loss sees, as in :func:`per_example_grads`.

    Returns:
        For every selected name, a tensor of the parameter's shape.
    """
    return loss_and_grad(model, loss_fn, inputs, *targets, params=params, output=output)[1]
