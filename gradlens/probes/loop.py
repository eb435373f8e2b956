"""Per-example gradients by a loop over examples, where ``vmap`` cannot batch the forward.

``vmap`` has no batching rule for the fused recurrent kernels (``nn.LSTM``,
``nn.GRU``, ``nn.RNN``: ``torch._VF.lstm`` and friends, cuDNN or oneDNN) nor for
packed sequences (``pack_padded_sequence`` reads the lengths as Python ints).
For a model that holds such a module, :func:`~gradlens.per_example_grads` takes
each example's gradient by its own ``torch.autograd.grad`` of the loss of
that example as a batch of one, the definition itself, so it is exact wherever one
example runs. The same loop serves a forward under ``torch.autocast`` that
``vmap`` fails on (``LayerNorm``'s backward under ``vmap`` meets mixed dtypes).

Cost: ``example`` forward and backward passes of one example each, no
batching across examples (memory: one example's activations at a time). The
ghost path's parameters are unaffected: they still come from one batch forward
and backward, so in ``method="auto"`` only the parameters without a factored
form (the RNN's own weights) pay the loop.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn = torch.nn.GRU(3, 4, batch_first=True)
    ...         self.head = torch.nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.head(self.rnn(x)[0][:, -1])
    >>> loop_reason(Net()).split(":")[0]
    "vmap cannot batch the fused kernel of 'rnn' (GRU) nor packed sequences"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradlens.errors import UnsupportedModelError
from gradlens.probes.batch import Inputs, take
from gradlens.probes.checks import Randomness

__all__ = ["check_loop_randomness", "loop_grads", "loop_reason"]


def _fused_rnns(model: nn.Module) -> list[tuple[str, nn.RNNBase]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]


def loop_reason(model: nn.Module) -> str | None:
    """Why per-example gradients of ``model`` must be taken by a loop, or ``None``.

    Args:
        model: The model.

    Returns:
        A sentence naming the first fused recurrent module, or ``None`` when
        ``model`` holds none (``vmap`` may batch it).
    """
    found = _fused_rnns(model)
    if not found:
        return None
    name, module = found[0]
    label = name or type(model).__name__
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return (
        f"vmap cannot batch the fused kernel of {label!r} ({type(module).__name__}){more} nor "
        "packed sequences: per-example gradients by a loop over examples"
    )


def check_loop_randomness(model: nn.Module, randomness: Randomness) -> None:
    """Raise if a recurrent module draws dropout masks while ``randomness="error"``.

    ``nn.LSTM(..., dropout=p)`` in training mode draws masks between its
    layers inside the fused kernel, where no dropout module shows it.

    Raises:
        UnsupportedModelError: Naming the module and the fix.
    """
    if randomness != "error":
        return
    for name, module in _fused_rnns(model):
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}, dropout={module.dropout}) draws "
                "random masks between its layers in training mode: pass "
                "randomness='different' (a mask per example) or 'same' (one mask for the "
                "batch), or call model.eval()."
            )


def loop_grads(
    loss: Callable[..., Tensor],
    params: dict[str, Tensor],
    inputs: Inputs,
    targets: tuple[Tensor, ...],
    count: int,
    randomness: Randomness,
) -> dict[str, Tensor]:
    """The gradient of ``loss`` on each example in turn (``torch.autograd.grad``), stacked.

    Plain autograd, not ``torch.func.grad``: the packed-sequence kernels need
    tensors with storage, which ``torch.func``'s wrappers do not have.

    Args:
        loss: ``loss(params, x, *targets)`` for one example (without its batch
            axis), as :func:`gradlens.probes.vmap.per_example_grads` builds it.
        params: The parameters to differentiate, detached.
        inputs: Shape ``(example, ...)``.
        targets: Each of shape ``(example, ...)``.
        count: The number of examples, at least one.
        randomness: ``"same"`` replays one random state for every example (one
            dropout mask for the batch); otherwise each example draws its own.

    Returns:
        For every name of ``params``, shape ``(example, *param.shape)``.
    """
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    state = torch.random.get_rng_state() if randomness == "same" else None
    cuda = torch.cuda.is_available() and any(p.is_cuda for p in params.values())
    cuda_state = torch.cuda.get_rng_state() if cuda and state is not None else None
    result: dict[str, Tensor] = {}
    for i in range(count):
        if state is not None:
            torch.random.set_rng_state(state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state)
        with torch.enable_grad():
            value = loss(leaves, take(inputs, i), *(t[i] for t in targets))
            if not isinstance(value, Tensor) or value.ndim != 0:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"loss_fn returned {shape} for one example; it must return a scalar, the "
                    "loss of the batch it is given: keep reduction='mean' (the default of "
                    "torch's losses) or end it with .mean()."
                )
            found = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        for (name, p), g in zip(leaves.items(), found, strict=True):
            if name not in result:
                result[name] = p.new_empty((count, *p.shape))
            result[name][i] = 0.0 if g is None else g
    return result
