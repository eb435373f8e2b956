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

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradlens.errors import UnsupportedModelError
from gradlens.probes.outputs import OutputSelector, no_kv_cache, select_output

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

LossFn = Callable[..., Tensor]
"""``loss_fn(outputs, *targets) -> scalar``, written for a batch."""

Randomness = Literal["error", "different", "same"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def split_params(
    model: nn.Module, params: Collection[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a model's parameters into the selected ones and the rest, detached.

    Args:
        model: The model.
        params: Names from ``model.named_parameters()`` to differentiate; by
            default every parameter that requires grad.

    Returns:
        ``(selected, frozen)``, two dicts of detached tensors.

    Raises:
        UnsupportedModelError: If a name in ``params`` is not a parameter of the model.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = [name for name, p in named.items() if p.requires_grad]
    else:
        unknown = sorted(set(params) - set(named))
        if unknown:
            raise UnsupportedModelError(
                f"params names {unknown} are not parameters of {type(model).__name__}; "
                f"choose among {sorted(named)}."
            )
        chosen = [name for name in named if name in set(params)]
    if not chosen:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no parameter to differentiate: pass `params` or set "
            "requires_grad on at least one parameter."
        )
    selected = {name: named[name].detach() for name in chosen}
    frozen = {name: p.detach() for name, p in named.items() if name not in selected}
    return selected, frozen


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise if ``chunk_size`` is neither ``None`` nor a positive number of examples.

    Raises:
        ValueError: For zero or a negative ``chunk_size``.
    """
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(
            f"chunk_size must be a positive number of examples, or None for all at once; "
            f"got {chunk_size}."
        )


def check_batch(inputs: Tensor, targets: tuple[Tensor, ...], *, what: str = "inputs") -> None:
    """Raise unless ``inputs`` and every target are tensors with the same number of examples.

    Args:
        inputs: Shape ``(example, ...)``.
        targets: Each of shape ``(example, ...)``.
        what: How the message names ``inputs``.

    Raises:
        TypeError: For an argument that is not a tensor.
        ValueError: For a 0-d ``inputs`` or a target whose first dim differs.
    """
    prefix = what.rpartition(".")[0] + "." if "." in what else ""
    labels = [f"{prefix}targets[{i}]" for i in range(len(targets))]
    for label, value in ((what, inputs), *zip(labels, targets, strict=True)):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{label} is a {type(value).__name__}; pass a tensor with the examples along "
                "its first dim (torch.as_tensor(...))."
            )
    if inputs.ndim == 0:
        raise ValueError(f"{what} is a 0-d tensor; it needs a first dim of examples.")
    count = inputs.shape[0]
    for label, target in zip(labels, targets, strict=True):
        if target.ndim == 0 or target.shape[0] != count:
            raise ValueError(
                f"{what} has {count} examples (shape {tuple(inputs.shape)}) but {label} has "
                f"shape {tuple(target.shape)}: every target needs one row per example, along "
                "its first dim. Pass the targets of the same examples as the inputs."
            )


def check_vmap_compatible(model: nn.Module, randomness: Randomness = "error") -> None:
    """Raise if a module would make per-example gradients wrong or fail under vmap.

    Args:
        model: The model.
        randomness: The ``vmap`` randomness choice the caller will use.

    Raises:
        UnsupportedModelError: For BatchNorm in training mode (it mixes the
            examples of a batch), or dropout in training mode while
            ``randomness="error"``. The message names the module and the remedy.
    """
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModelError(
                f"module {label!r} ({type(module).__name__}) is in training mode: BatchNorm "
                "normalises with statistics of the whole batch, so one example's gradient "
                "depends on the others. Call model.eval() before probing, or replace it with "
                "GroupNorm/LayerNorm."
            )
        if (
            isinstance(module, _DROPOUT)
            and module.training
            and module.p > 0
            and (randomness == "error")
        ):
            raise UnsupportedModelError(
                f"module {label!r} ({type(module).__name__}) draws random masks in training "
                "mode: pass randomness='different' (a mask per example) or 'same' (one mask "
                "for the batch), or call model.eval()."
            )


def _one_example_loss(
    model: nn.Module,
    loss_fn: LossFn,
    frozen: dict[str, Tensor],
    buffers: dict[str, Tensor],
    output: OutputSelector | None = None,
) -> Callable[..., Tensor]:
    """Build ``loss(params, x, *targets)`` for one example, fed as a batch of one."""

    def loss(params: dict[str, Tensor], x: Tensor, *targets: Tensor) -> Tensor:
        found = functional_call(model, (params, frozen, buffers), (x.unsqueeze(0),))
        return loss_fn(select_output(found, output), *(t.unsqueeze(0) for t in targets))

    return loss


@contextmanager
def _explain_vmap_failures(model: nn.Module, plain_call: Callable[[], object]) -> Iterator[None]:
    """Turn a failure that only vmap has into an :class:`UnsupportedModelError`.

    If the block raises a ``RuntimeError`` but ``plain_call`` (the same
    computation on one example, without vmap) succeeds, the model does
    something vmap cannot batch, usually an in-place write of per-example
    values into a tensor shared by the batch. The error names the innermost
    module that was running. Errors that the plain call reproduces are the
    caller's own and propagate unchanged.
    """
    running: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        return lambda *_: running.append(name)

    def leave(*_: object) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    except RuntimeError as err:
        where = running[-1] if running and running[-1] else type(model).__name__
        for handle in handles:
            handle.remove()
        try:
            value = plain_call()
        except Exception:
            raise err from None
        if isinstance(value, Tensor) and value.ndim > 0:
            raise ValueError(
                f"loss_fn returned a tensor of shape {tuple(value.shape)} for one example; it must "
                "return a scalar, the loss of the batch it is given: keep reduction='mean' (the "
                "default of torch's losses) or end it with .mean()."
            ) from err
        if "random operation" in str(err) and "randomness" in str(err):
            raise UnsupportedModelError(
                f"module {where!r} draws random numbers (a functional dropout such as "
                "F.dropout(x, p, training=True), or torch.rand) while randomness='error': pass "
                "randomness='different' (independent draws per example, as in training) or "
                "'same' (one draw for the batch), or make the forward deterministic "
                "(F.dropout(x, p, training=self.training) and model.eval())."
            ) from err
        raise UnsupportedModelError(
            f"module {where!r} fails under vmap although one example runs without it: it "
            "probably writes per-example values in place into a tensor shared by the batch. "
            "Use the out-of-place op (for example `y = y + x` for `y += x`) or build the "
            f"tensor from the input. vmap said: {str(err).splitlines()[0]}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


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
    if inputs.shape[0] == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in selected.items()}
    buffers = dict(model.named_buffers())
    loss = _one_example_loss(model, loss_fn, frozen, buffers, output)
    in_dims = (None, 0, *([0] * len(targets)))
    batched = vmap(grad(loss), in_dims=in_dims, randomness=randomness)
    count = inputs.shape[0]
    step = chunk_size or count
    result: dict[str, Tensor] = {}

    def plain() -> Tensor:
        return loss(selected, inputs[0], *(t[0] for t in targets))

    with no_kv_cache(model), _explain_vmap_failures(model, plain):
        # Chunks are written into one preallocated result: vmap's own chunk_size
        # concatenates them at the end, which doubles the peak memory.
        for start in range(0, count, step):
            part = slice(start, start + step)
            grads = batched(selected, inputs[part], *(t[part] for t in targets))
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
    with torch.enable_grad(), no_kv_cache(model):
        outputs = functional_call(model, (selected, frozen, buffers), (inputs,))
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
