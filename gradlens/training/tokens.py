"""Token-level alignment in a probed step: the opt-in ``token_dot`` record.

``probed_step(..., token_loss=token_losses)`` records
``token_dot[i, t] = <grad l_{i,t}, g_t>`` for every training example ``i`` and
token ``t`` (:func:`~gradlens.probes.token_dots`), at the parameters the step
starts from, dims ``(step, example, token)``. ``token_loss`` splits the
training loss into per-token terms; that its terms sum to the training loss is
checked on the batch, so the record cannot describe another loss than the one
stepped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from gradlens.probes.checks import LossFn, mean_loss_rtol
from gradlens.probes.outputs import OutputSelector
from gradlens.probes.tokens import token_dots_and_losses
from gradlens.training.objective import Objective

__all__ = ["TokenProbe", "token_probe"]

TokenProbe = Callable[[dict[str, Tensor], Tensor], Tensor]
"""``probe(g_t, train_loss) -> (example, token)``: the step's token dots, checked."""


def token_probe(
    model: nn.Module,
    token_loss: LossFn,
    batches: Sequence[Objective],
    *,
    chunk_size: int | None = None,
    output: OutputSelector | None = None,
) -> TokenProbe:
    """The token dots of a step's training batches against ``g_t``, as the step body calls them.

    Args:
        model: The model stepped.
        token_loss: ``token_loss(outputs, *targets) -> (example, token)``, the
            per-token terms of ``train.loss_fn`` (each example's row sums to its loss).
        batches: The step's training micro-batches, in order.
        chunk_size: Examples per ``vmap`` chunk.
        output: The model's output selector.

    Returns:
        ``probe(g_t, train_loss)``: ``(example, token)`` dots, the micro-batches'
        concatenated along ``example``. It raises ``ValueError`` if the terms'
        mean row sum is not ``train_loss`` (the batch's training loss), to the
        dtype's rounding.
    """

    def probe(g_t: dict[str, Tensor], train_loss: Tensor) -> Tensor:
        found = [
            token_dots_and_losses(
                model,
                token_loss,
                b.inputs,
                *b.targets,
                reference=g_t,
                params=list(g_t),
                chunk_size=chunk_size,
                output=output,
            )
            for b in batches
        ]
        lengths = {d.shape[1] for d, _ in found if d.shape[0] > 0}
        if len(lengths) > 1:
            raise ValueError(
                f"the micro-batches have {sorted(lengths)} tokens: token_dot needs one token "
                "length per step; pad every micro-batch to the same length."
            )
        kept = [(d, t) for d, t in found if d.shape[0] > 0]
        if not kept:
            return found[0][0]
        dots = torch.cat([d for d, _ in kept])
        losses = torch.cat([t for _, t in kept])
        split = float(losses.sum(1).double().mean())
        value = float(train_loss.double())
        if abs(split - value) > mean_loss_rtol(losses.dtype) * max(abs(split), abs(value)) + 1e-7:
            raise ValueError(
                f"token_loss's terms give a training loss of {split:.6g} but train.loss_fn "
                f"gives {value:.6g}: token_loss must split train.loss_fn into per-token terms "
                "(each example's row summing to its loss), e.g. training.losses.token_losses "
                "with the weights and shift of token_mean (Objective.from_tokens uses both)."
            )
        return dots.detach()

    return probe
