"""What the per-example paths refuse, and why: checks made before any vmap runs.

Shared by :mod:`gradlens.probes.vmap`, :mod:`gradlens.probes.ghost` and the
training step: which parameters are probed, batch shapes, chunk sizes, modules
that mix examples or draw random numbers, and the one translation of a vmap
failure into an error that names the module and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from gradlens.errors import UnsupportedModelError
from gradlens.probes.batch import Inputs, describe, examples
from gradlens.probes.deferred import active_ledger

__all__ = [
    "DeferredCheck",
    "LossFn",
    "Randomness",
    "check_batch",
    "check_chunk_size",
    "check_mean_loss",
    "check_not_meta",
    "check_vmap_compatible",
    "explain_vmap_failures",
    "mean_loss_check",
    "mean_loss_rtol",
    "settle",
    "split_params",
]

LossFn = Callable[..., Tensor]
"""``loss_fn(outputs, *targets) -> scalar``, written for a batch."""

Randomness = Literal["error", "different", "same"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


_RNNS = (nn.RNNBase,)


def _vmap_cause(model: nn.Module, where: str, said: str) -> str:
    """The likely cause of a failure that only vmap has, and its fix, from what vmap said."""
    module = dict(model.named_modules()).get(where, model)
    if isinstance(module, _RNNS):
        return (
            f"vmap cannot batch the fused kernel of {type(module).__name__} (nor packed "
            "sequences), so per-example gradients of its weights cannot be taken by vmap. Use "
            "method='auto' for the other parameters and freeze the RNN "
            "(requires_grad_(False)), or write its recurrence with nn.LSTMCell / nn.GRUCell "
            "over the time steps, which vmap batches."
        )
    if ".item()" in said or "data-dependent control flow" in said:
        return (
            "it branches on a tensor's value (an `if` on a tensor, .item(), or a shape read "
            "from the data, such as checking whether any token is masked; Hugging Face's own "
            "mask code is made branch-free while gradlens probes), which vmap cannot batch. "
            "Give the branch-free form (compute both sides and pick with torch.where, pass a "
            "mask already expanded), or use method='auto' so that only the parameters without "
            "a factored form need vmap."
        )
    return (
        "it probably writes per-example values in place into a tensor shared by the batch. "
        "Use the out-of-place op (for example `y = y + x` for `y += x`) or build the "
        "tensor from the input."
    )


def check_not_meta(model: nn.Module) -> None:
    """Raise if ``model`` has parameters or buffers on the meta device (shapes, no values)."""
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        shown = meta if len(meta) <= 3 else [*meta[:3], f"... {len(meta) - 3} more"]
        raise UnsupportedModelError(
            f"{type(model).__name__} has tensors on the meta device ({shown}): they have shapes "
            "but no values, so nothing can be probed. Materialise the model first: "
            "model.to_empty(device='cpu') and then load its weights (load_state_dict), or "
            "build it outside torch.device('meta')."
        )


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
    check_not_meta(model)
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


def check_batch(inputs: Inputs, targets: tuple[Tensor, ...], *, what: str = "inputs") -> None:
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
    if isinstance(inputs, Mapping):
        count = examples(inputs)  # every tensor of a dict batch: one example axis
    for label, value in ((what, inputs), *zip(labels, targets, strict=True)):
        if isinstance(value, Mapping) and label == what:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{label} is a {type(value).__name__}; pass a tensor with the examples along "
                "its first dim (torch.as_tensor(...))."
            )
    if isinstance(inputs, Tensor) and inputs.ndim == 0:
        raise ValueError(f"{what} is a 0-d tensor; it needs a first dim of examples.")
    count = examples(inputs)
    for label, target in zip(labels, targets, strict=True):
        if target.ndim == 0 or target.shape[0] != count:
            raise ValueError(
                f"{what} has {count} examples (shape {describe(inputs)}) but {label} has "
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


@contextmanager
def explain_vmap_failures(model: nn.Module, plain_call: Callable[[], object]) -> Iterator[None]:
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
            f"module {where!r} fails under vmap although one example runs without it: "
            f"{_vmap_cause(model, where, str(err))} vmap said: {str(err).splitlines()[0]}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


def mean_loss_rtol(dtype: torch.dtype) -> float:
    """How far a batch loss may be from the mean of its examples' losses: the dtype's rounding.

    ``max(1e-4, 8 eps)``: 1e-4 in float32, 0.06 in bfloat16, whose rounding a
    tighter tolerance would take for a loss that is not a mean.
    """
    return max(1e-4, 8 * torch.finfo(dtype).eps)


class DeferredCheck(NamedTuple):
    """A check whose verdict is a device flag, so that several share one host read.

    Attributes:
        failed: ``()`` bool tensor, True where the check fails (computed on the
            device, not read).
        explain: Raises the check's error, naming the cause (reads what it
            needs); called only when some flag of :func:`settle` is set.
    """

    failed: Tensor
    explain: Callable[[], None]


def settle(checks: Sequence[DeferredCheck], *, deferrable: bool = True) -> None:
    """Raise the first failing check's error, in order, after one host read of every flag.

    Inside :func:`~gradlens.probes.deferred.deferred_checks` the checks are held
    instead, and read with the others of later steps; ``deferrable=False``
    (planning) reads them now regardless.
    """
    if not checks:
        return
    ledger = active_ledger() if deferrable else None
    if ledger is not None:
        ledger.add(checks)
        return
    if not bool(torch.stack([c.failed for c in checks]).any()):  # the one read
        return
    for check in checks:
        check.explain()


def mean_loss_check(batch_loss: Tensor, losses: Tensor) -> DeferredCheck:
    """:func:`check_mean_loss` as a :class:`DeferredCheck`: its verdict on the device.

    The flag is set exactly where :func:`check_mean_loss` raises: a finite batch
    loss beside a non-finite mean of the examples' losses, or both finite and
    apart by more than :func:`mean_loss_rtol` (float64, as the explanation compares).
    """
    if losses.numel() < 2:
        failed = torch.zeros((), dtype=torch.bool, device=losses.device)
    else:
        value = batch_loss.detach().reshape(()).double()
        mean = losses.detach().double().mean()
        rtol = mean_loss_rtol(losses.dtype)
        close = (value - mean).abs() <= rtol * torch.maximum(value.abs(), mean.abs()) + 1e-7
        failed = value.isfinite() & ~(mean.isfinite() & close)
    return DeferredCheck(failed, lambda: _explain_mean_loss(batch_loss, losses))


def check_mean_loss(batch_loss: Tensor, losses: Tensor) -> None:
    """Raise unless the batch loss is the mean of the examples' losses, to the dtype's rounding.

    A probe's batch gradient is the mean of the per-example gradients, which is
    the gradient of the batch loss only for such a loss. The whole batch is
    checked, on outputs already computed (no forward): a loss that averages
    over the tokens of the whole batch (``F.cross_entropy(..., ignore_index=-100)``
    on ``(example * token, vocab)``, Hugging Face models' own loss) passes only
    when every example has as many valid tokens, which is when it is exact.

    Args:
        batch_loss: ``loss_fn`` on the batch, shape ``()``.
        losses: ``loss_fn`` on each example alone, ``(example,)``.

    Raises:
        ValueError: Naming both values and the likely cause; also when the batch
            loss is finite but an example's own loss is not (an example without
            a valid token under a token mean).
    """
    settle([mean_loss_check(batch_loss, losses)])


def _explain_mean_loss(batch_loss: Tensor, losses: Tensor) -> None:
    """The error :func:`check_mean_loss` raises, from the values on the host."""
    if losses.numel() < 2:
        return
    found = torch.stack([batch_loss.detach().reshape(()).double(), losses.detach().double().mean()])
    value, mean = found.tolist()
    if math.isfinite(value) and not math.isfinite(mean):
        bad = (~losses.detach().isfinite()).nonzero().flatten().tolist()
        raise ValueError(
            f"the batch loss is {value:.6g} but examples {bad[:10]} have a non-finite loss "
            "alone: gradlens steps along (and probes) the mean of the examples' own gradients, "
            "which then is not the gradient of the batch loss. Most often an example without "
            "a valid token (all labels -100) under a mean over tokens, 0 / 0 alone: use "
            "training.losses.token_mean (0 for such an example; Objective.from_tokens, with "
            "weighting='batch' for the batch token mean), or drop such examples."
        )
    if not (math.isfinite(value) and math.isfinite(mean)):
        return  # the non-finite gradient it gives is reported by check_finite
    rtol = mean_loss_rtol(losses.dtype)
    if abs(value - mean) <= rtol * max(abs(value), abs(mean)) + 1e-7:
        return
    count = losses.numel()
    if abs(value - count * mean) <= rtol * abs(value) + 1e-7:
        cause = (
            "It is their sum (reduction='sum'): divide it by the number of examples, or keep "
            "reduction='mean'."
        )
    else:
        cause = (
            "It weighs the examples unequally: most often a mean over the tokens of the whole "
            "batch (F.cross_entropy(..., ignore_index=-100) on (example * token, vocab), as "
            "Hugging Face models compute their loss), which weighs each example by its number "
            "of valid tokens, or class weights. Average each example's token losses first: "
            "loss = ((token_loss * mask).sum(1) / mask.sum(1)).mean() (per-example token "
            "means), or keep the batch token mean with each example's weight as a target: "
            "Objective.from_tokens(batch, weighting='batch') (training.losses.token_weights)."
        )
    raise ValueError(
        f"the batch loss is {value:.6g} but the mean of the {count} examples' own losses is "
        f"{mean:.6g}. gradlens steps along (and probes) the mean of the per-example gradients, "
        f"which is the gradient of the batch loss only when that loss is the mean of the "
        f"examples' losses. {cause}"
    )
