"""Liminal training: a decaying pull of the student towards its base model.

Yanagisawa et al. (2025), "Liminal training: characterizing and mitigating
subliminal learning in large language models", counter subliminal learning by
adding to the distillation loss a KL term that keeps the student close to the
base model it started from, with a weight annealed to zero over training::

    loss = distill_loss + liminal_weight(step, lambda0=..., period=...)
                          * liminal_loss(student_logits, base_logits)

gradlens anneals linearly: the weight falls from ``lambda0`` at step 0 to 0 at
step ``period`` and stays 0 after.

Example:
    >>> import torch
    >>> [liminal_weight(s, lambda0=1.0, period=4) for s in (0, 2, 4, 9)]
    [1.0, 0.5, 0.0, 0.0]
    >>> logits = torch.tensor([[1.0, 2.0, 3.0]])
    >>> float(liminal_loss(logits, logits))
    0.0
"""

from __future__ import annotations

import math

from torch import Tensor

from gradlens.losses import kl_divergence

__all__ = ["liminal_loss", "liminal_weight"]


def liminal_weight(step: int, *, lambda0: float, period: int) -> float:
    """Return the liminal weight at ``step``: ``lambda0 * max(0, 1 - step / period)``.

    Args:
        step: The training step, from 0.
        lambda0: The weight at step 0; ``>= 0``.
        period: The step at which the weight reaches 0; ``> 0``.

    Returns:
        The weight, from ``lambda0`` at step 0 down to 0 at ``period`` and after.

    Raises:
        ValueError: If ``lambda0`` is negative or not finite, ``period <= 0`` or ``step < 0``.
    """
    if not (math.isfinite(lambda0) and lambda0 >= 0):
        raise ValueError(f"lambda0 must be a finite number >= 0, got {lambda0!r}.")
    if period <= 0:
        raise ValueError(f"period must be > 0 steps, got {period!r}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}.")
    return lambda0 * max(0.0, 1.0 - step / period)


def liminal_loss(student_logits: Tensor, base_logits: Tensor) -> Tensor:
    """Return ``KL(softmax(base) || softmax(student))``, averaged over examples.

    The base model is a fixed target: ``base_logits`` is detached, so the
    gradient reaches the student only. For token-level logits, flatten
    ``(example, token, class)`` to ``(example * token, class)`` first; the
    mean is then over tokens.

    Args:
        student_logits: Shape ``(example, class)``.
        base_logits: Shape ``(example, class)``, the base model's logits.

    Returns:
        A 0-d tensor, ``mean_i sum_k p_ik (log p_ik - log q_ik)`` with ``p``
        the base and ``q`` the student probabilities.

    Raises:
        ValueError: If the logits are not 2-D or their shapes differ.
    """
    if student_logits.ndim != 2 or student_logits.shape != base_logits.shape:
        raise ValueError(
            "student_logits and base_logits must both have shape (example, class); got "
            f"{tuple(student_logits.shape)} and {tuple(base_logits.shape)}. Flatten token "
            "dimensions into the example dimension first."
        )
    return kl_divergence(student_logits, base_logits)
