"""What a probed step differentiates: a loss on a batch.

An :class:`Objective` is ``loss_fn(model(inputs), *targets)``: the training
objective (for a student, the distillation loss plus any extra term such as
liminal training's KL to the base model) or the trait objective (for MNIST,
cross-entropy on labelled digits). ``parts`` names pieces of a combined loss
that the step records beside it (``train_loss_part``), so a loss built with
:func:`weighted_sum` can still report its main term alone.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> loss = weighted_sum(F.mse_loss, F.l1_loss, 0.5, split=1)
    >>> out, t1, t2 = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    >>> float(loss(out, t1, t2))  # 1 + 0.5 * 2
    2.0
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, TypeAlias

from torch import Tensor

from gradlens.probes.batch import Inputs, examples, take
from gradlens.probes.vmap import LossFn
from gradlens.training.losses import token_mean, token_weights

__all__ = ["Objective", "Weighting", "weighted_sum"]

Weighting: TypeAlias = Literal["example", "batch"]
"""How a token loss weighs the examples: each the same, or by its number of valid tokens."""


@dataclass(frozen=True)
class Objective:
    """A loss on a batch: ``loss_fn(model(inputs), *targets)``.

    In a stacked step (:func:`~gradlens.training.stacked_probed_step`) every
    tensor carries a leading ``model`` dim first: ``inputs`` of shape
    ``(model, example, ...)`` (``x.expand(models, *x.shape)`` for a batch that
    every model shares, without a copy).

    Attributes:
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch, mean-reduced.
        inputs: Shape ``(example, ...)``, or a dict of such tensors that the model
            takes as keywords (``model(**inputs)``: a Hugging Face batch without its labels;
            see :meth:`from_batch`).
        targets: Each of shape ``(example, ...)``.
        parts: Named pieces of the loss, each called like ``loss_fn``; the step
            records their values on the batch as ``train_loss_part`` (for the
            training objective only).
    """

    loss_fn: LossFn
    inputs: Inputs
    targets: tuple[Tensor, ...] = field(default_factory=tuple)
    parts: Mapping[str, LossFn] = field(default_factory=dict)

    @classmethod
    def from_batch(
        cls,
        loss_fn: LossFn,
        batch: Mapping[str, Tensor],
        *,
        targets: tuple[str, ...] = ("labels",),
        parts: Mapping[str, LossFn] | None = None,
    ) -> Objective:
        """An objective from a batch dict as a data collator returns it.

        The ``targets`` keys (``labels``, with -100 where ignored) become the
        targets, in order; every other key is an input the model takes as a
        keyword. Give the model a loss it does not compute itself: the model
        never sees the labels.

        Args:
            loss_fn: ``loss_fn(outputs, *targets)`` (e.g. ``training.losses.token_mean``).
            batch: Name -> ``(example, ...)`` tensor.
            targets: The keys that are targets, not inputs.
            parts: As the attribute.

        Raises:
            KeyError: If a target key is not in the batch.
        """
        missing = [k for k in targets if k not in batch]
        if missing:
            raise KeyError(
                f"the batch has no {missing} (it has {sorted(batch)}): name the target keys "
                "with targets=(...)."
            )
        inputs = {k: v for k, v in batch.items() if k not in targets}
        return cls(loss_fn, inputs, tuple(batch[k] for k in targets), dict(parts or {}))

    @classmethod
    def from_tokens(
        cls,
        batch: Mapping[str, Tensor],
        *,
        weighting: Weighting = "example",
        shift: bool = True,
        labels: str = "labels",
    ) -> Objective:
        """A language-model objective from a collated batch dict: token cross-entropy.

        The loss is :func:`~gradlens.training.losses.token_mean`; ``weighting``
        says how it weighs the examples, and so what the probed step follows:

        - ``"example"``: per-example token means, ``mean_i l_i`` (``l_i`` the
          mean over example ``i``'s valid tokens); every example weighs the same.
        - ``"batch"``: the batch token mean, ``sum_{i,t} l_{i,t} / sum_i n_i``,
          the loss Hugging Face models compute with ``labels=``; example ``i``
          weighs ``w_i = n_i / mean_j n_j`` (:func:`~gradlens.training.losses.token_weights`,
          added as a second target), and its per-example loss and gradient are
          ``w_i l_i`` and ``w_i grad l_i``, whose mean over the batch is the
          loss and its gradient.

        Args:
            batch: Name -> ``(example, ...)``; ``labels`` at -100 where ignored.
            weighting: ``"example"`` or ``"batch"``.
            shift: Labels are the input ids, predicted one position on (a causal LM).
            labels: The key of the labels.

        Raises:
            KeyError: If the batch has no ``labels`` key.
            ValueError: For another ``weighting``.
        """
        if weighting not in ("example", "batch"):
            raise ValueError(
                f"weighting must be 'example' (per-example token means) or 'batch' (the batch "
                f"token mean, each example weighted by its valid tokens), not {weighting!r}."
            )
        found = cls.from_batch(partial(token_mean, shift=shift), batch, targets=(labels,))
        if weighting == "example":
            return found
        weights = token_weights(batch[labels], shift=shift)
        return cls(found.loss_fn, found.inputs, (*found.targets, weights))

    def split(self, size: int) -> list[Objective]:
        """Micro-batches of at most ``size`` examples, for gradient accumulation.

        Every input and target is sliced along ``example``, so targets computed
        from the whole batch (the weights of ``from_tokens(..., weighting="batch")``)
        stay those of the whole batch: ``probed_step(model, opt, train.split(k), ...)``
        steps as ``probed_step(model, opt, train, ...)`` does.

        Raises:
            ValueError: If ``size`` is not positive.
        """
        if size < 1:
            raise ValueError(f"size must be a positive number of examples, not {size}.")
        return [
            Objective(
                self.loss_fn,
                take(self.inputs, slice(start, start + size)),
                tuple(t[start : start + size] for t in self.targets),
                self.parts,
            )
            for start in range(0, examples(self.inputs), size)
        ]


def weighted_sum(main: LossFn, extra: LossFn, weight: float, split: int) -> LossFn:
    """Combine two losses: ``main(out, *t[:split]) + weight * extra(out, *t[split:])``.

    Args:
        main: The main loss, taking the first ``split`` targets.
        extra: The extra term, taking the remaining targets.
        weight: The extra term's weight at this step.
        split: How many targets belong to ``main``.

    Returns:
        The combined loss function.
    """

    def loss(outputs: Tensor, *targets: Tensor) -> Tensor:
        return main(outputs, *targets[:split]) + weight * extra(outputs, *targets[split:])

    return loss
