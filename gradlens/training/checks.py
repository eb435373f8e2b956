"""The refusals of a probed step, made before any forward changes a buffer.

Every mode of the step (one model, a stack of models, data parallel) runs
these same checks; a mode only says how to run one model's forward
(:func:`check_mean_reduction` takes it as a callable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gradlens.probes.batch import Inputs, describe, examples, take
from gradlens.probes.vmap import check_batch
from gradlens.training.objective import Objective

__all__ = ["check_mean_reduction", "check_objective", "check_optimizer"]


def check_objective(which: str, objective: Objective, *, allow_empty: bool = False) -> None:
    """Raise for an objective whose targets do not match its inputs, or without examples.

    Args:
        which: How the message names it (``"train"``, ``"trait"``).
        objective: The objective.
        allow_empty: Accept a batch of no examples (a rank's empty shard).
    """
    check_batch(objective.inputs, objective.targets, what=f"{which}.inputs")
    if examples(objective.inputs) == 0 and not allow_empty:
        raise ValueError(
            f"{which}.inputs has no examples (shape {describe(objective.inputs)}); a probed "
            f"step needs at least one in each batch. Skip empty batches (for a DataLoader, "
            "drop_last=True)."
        )


def check_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> None:
    """Raise if ``optimizer`` would not update some of ``params`` (a step would be a no-op)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in held]
    if missing:
        shown = missing if len(missing) <= 4 else [*missing[:4], f"... {len(missing) - 4} more"]
        raise ValueError(
            f"the optimizer does not hold the model's parameters {shown}, so its step would "
            "leave them unchanged. Build it from this model's parameters, "
            "torch.optim.SGD(model.parameters(), ...), after any copy.deepcopy or .to(...) "
            "that replaces them; freeze parameters you do not train (requires_grad_(False))."
        )


def check_mean_reduction(
    forward: Callable[[Tensor], Tensor],
    loss_fn: Callable[..., Tensor],
    inputs: Inputs,
    targets: tuple[Tensor, ...],
) -> None:
    """Raise unless the loss of two examples is the mean of their losses alone.

    A probed step steps along the mean of the per-example gradients, which is
    the gradient of the batch loss only when that loss is the mean of the
    per-example losses; for ``reduction='sum'`` it would be a step ``example``
    times smaller than a plain backward. One forward of two examples, one
    host sync, and the random number streams left as they were (a dropout
    draw here must not change the step's masks).

    Args:
        forward: One model's forward, returning the tensor the loss sees.
        loss_fn: The training loss.
        inputs: One model's training inputs, ``(example, ...)``.
        targets: Its targets.
    """
    if examples(inputs) < 2:
        return
    device = targets[0].device if targets else torch.device("cpu")
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        outputs = forward(take(inputs, slice(0, 2)))
        two = [t[:2] for t in targets]
        batch = loss_fn(outputs, *two)
        if not isinstance(batch, Tensor) or batch.numel() != 1:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(
                f"train.loss_fn returned {shape} for a batch of 2; it must return a scalar, the "
                "mean loss of the batch: keep reduction='mean' (the default of torch's losses) "
                "or end it with .mean()."
            )
        each = [loss_fn(outputs[i : i + 1], *(t[i : i + 1] for t in two)) for i in (0, 1)]
        found = torch.stack([batch.reshape(()), *(e.reshape(()) for e in each)]).tolist()
    value, each = found[0], found[1:]
    mean = (each[0] + each[1]) / 2
    if not all(map(math.isfinite, (value, *each))):
        return  # the non-finite gradient it gives is reported by check_finite
    # bfloat16 rounds at 4e-3: a tolerance tighter than the dtype would refuse a mean loss
    rtol = max(1e-3, 8 * torch.finfo(outputs.dtype).eps) if outputs.is_floating_point() else 1e-3
    if abs(value - mean) <= rtol * max(abs(value), abs(mean)) + 1e-6:
        return
    looks = (
        " It is their sum: reduction='sum'?"
        if abs(value - 2 * mean) <= rtol * abs(value) + 1e-6
        else " It weighs them unequally: a mean over the tokens of the batch, or class weights?"
    )
    raise ValueError(
        f"train.loss_fn gives {value:.6g} for two examples whose losses alone are {each[0]:.6g} "
        f"and {each[1]:.6g} (mean {mean:.6g}).{looks} probed_step steps along the mean of the "
        "per-example gradients, which is the batch gradient only for a loss that is the mean "
        "of the examples' losses: use reduction='mean' (the default of torch's losses), "
        "divide a summed loss by the number of examples, or, for token losses, average each "
        "example's tokens first: ((token_loss * mask).sum(1) / mask.sum(1)).mean()."
    )
