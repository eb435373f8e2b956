"""Liminal training as published: a temperature-scaled pull of the student towards its base model.

Yanagisawa, Gho et al., "On Mitigation of Subliminal Learning in Large Language
Models" (Findings of EMNLP 2026, as the code's ``CITATION.cff`` names it), add to
the training loss a KL term that keeps the student close to the base model it
started from, with a weight that changes over training::

    loss = task_loss + liminal_schedule("liminal", step=..., steps_per_epoch=...,
                                        total_steps=..., lambda_0=...)
                       * liminal_loss(student_logits, base_logits, temperature=2.0)

Both functions match the authors' code, BrendanGho/liminal-training at commit
``b71ab9a0f06bad45268fd29d5ebfa32b0056c580``: ``compute_kl_divergence`` and
``get_lambda_kl`` in ``scripts/finetune_liminal.py`` and the schedule names in
``sl/training/schedules.py``. What was matched:

- **Loss**: ``F.kl_div(log_softmax(student / T), softmax(base / T),
  reduction="batchmean") * T**2`` over the unpadded token positions, so
  ``T**2 * KL(softmax(base / T) || softmax(student / T))`` averaged over rows
  (tokens there, examples here), ``T = 2`` by default; the base logits carry
  no gradient.
- **Schedules**: ``step`` is the number of optimizer steps already taken
  (``global_step`` before the update, so 0 at the first step), ``total_steps``
  the number of optimizer steps in the run. Their code derives the epoch
  length as ``total_steps / n_epochs``; gradlens takes ``steps_per_epoch``
  directly, the same number when ``total_steps = n_epochs * steps_per_epoch``
  (their default, without ``--max-steps``). Their ``--tau-2`` (phase 1 as a
  fraction other than one epoch) is not offered.

The names (lower case here; theirs are upper case and matched case-insensitively):

``"liminal"`` (their default)
    ``lambda_0 -> 1`` linearly over the first epoch (``step <= steps_per_epoch``),
    then ``1 -> 0`` linearly until ``total_steps``; 0 after.
``"constant"``
    ``lambda_0`` throughout.
``"pos_anneal"``
    ``lambda_0 * step / total_steps`` (0 up to ``lambda_0``).
``"neg_anneal"``
    ``lambda_0 * max(0, 1 - step / total_steps)``.
``"anchor"``
    ``lambda_0`` while ``step < steps_per_epoch``, 0 after.
``"end_anchor"``
    0 until ``step >= total_steps - steps_per_epoch`` (the last epoch), ``lambda_0`` then.
``"early_decay"`` (gradlens's earlier variant, not in the paper)
    ``lambda_0 * max(0, 1 - step / steps_per_epoch)``: down to 0 within the
    first epoch; :func:`liminal_weight` with ``period = steps_per_epoch``.

Example:
    >>> import torch
    >>> kw = {"steps_per_epoch": 4, "total_steps": 12, "lambda_0": 0.5}
    >>> [liminal_schedule("liminal", step=s, **kw) for s in (0, 2, 4, 8, 12)]
    [0.5, 0.75, 1.0, 0.5, 0.0]
    >>> logits = torch.tensor([[1.0, 2.0, 3.0]])
    >>> float(liminal_loss(logits, logits))
    0.0
"""

from __future__ import annotations

import math

from torch import Tensor

from gradlens.training.losses import kl_divergence

__all__ = ["LIMINAL_SCHEDULES", "liminal_loss", "liminal_schedule", "liminal_weight"]

LIMINAL_SCHEDULES: tuple[str, ...] = (
    "liminal",
    "constant",
    "pos_anneal",
    "neg_anneal",
    "anchor",
    "end_anchor",
    "early_decay",
)
"""The names :func:`liminal_schedule` takes: the published six, then gradlens's early decay."""


def liminal_schedule(
    name: str, *, step: int, steps_per_epoch: int, total_steps: int, lambda_0: float = 1.0
) -> float:
    """Return the liminal weight ``lambda`` at optimizer step ``step`` of a named schedule.

    Args:
        name: One of :data:`LIMINAL_SCHEDULES` (case-insensitive; the module
            docstring gives each formula).
        step: Optimizer steps taken before this one; 0 at the first step.
        steps_per_epoch: Optimizer steps in one epoch; ``> 0``.
        total_steps: Optimizer steps in the whole run; ``>= steps_per_epoch``.
        lambda_0: The schedule's scale (``"liminal"``'s weight at step 0); finite, ``>= 0``.

    Returns:
        The weight on :func:`liminal_loss` at this step.

    Raises:
        ValueError: For an unknown ``name``, a negative ``step``, a
            non-positive ``steps_per_epoch``, ``total_steps < steps_per_epoch``,
            or a negative or non-finite ``lambda_0``.
    """
    key = name.lower()
    if key not in LIMINAL_SCHEDULES:
        raise ValueError(f"name must be one of {LIMINAL_SCHEDULES}, got {name!r}.")
    if not (math.isfinite(lambda_0) and lambda_0 >= 0):
        raise ValueError(f"lambda_0 must be a finite number >= 0, got {lambda_0!r}.")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch!r}.")
    if total_steps < steps_per_epoch:
        raise ValueError(
            f"total_steps must be >= steps_per_epoch ({steps_per_epoch}), got {total_steps!r}: "
            "count both in optimizer steps."
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}.")
    t = step / total_steps
    if key == "constant":
        return lambda_0
    if key == "pos_anneal":
        return lambda_0 * t
    if key == "neg_anneal":
        return lambda_0 * max(0.0, 1.0 - t)
    if key == "anchor":
        return lambda_0 if step < steps_per_epoch else 0.0
    if key == "end_anchor":
        return lambda_0 if step >= total_steps - steps_per_epoch else 0.0
    if key == "early_decay":
        return liminal_weight(step, lambda0=lambda_0, period=steps_per_epoch)
    # "liminal": the published two-phase schedule, phase 1 ending at tau_2 = one epoch.
    tau_2 = steps_per_epoch / total_steps
    if t <= tau_2:
        return lambda_0 + (1.0 - lambda_0) * (t / tau_2)
    if t <= 1.0:
        return 1.0 - (t - tau_2) / (1.0 - tau_2)
    return 0.0


def liminal_weight(step: int, *, lambda0: float, period: int) -> float:
    """Return ``lambda0 * max(0, 1 - step / period)``: the ``"early_decay"`` schedule.

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


def liminal_loss(
    student_logits: Tensor, base_logits: Tensor, *, temperature: float = 2.0
) -> Tensor:
    """Return ``T**2 * KL(softmax(base / T) || softmax(student / T))``, averaged over rows.

    The published loss (``temperature=2.0``); ``temperature=1.0`` is the plain
    KL. The base model is a fixed target: ``base_logits`` is detached, so the
    gradient reaches the student only. For token-level logits, flatten the
    unpadded positions ``(example, token, class)`` to ``(example * token,
    class)`` first, as the published code does; the mean is then over tokens.
    Works under ``torch.func.vmap`` (over a leading ``model`` axis, say).

    Args:
        student_logits: Shape ``(example, class)``.
        base_logits: Shape ``(example, class)``, the base model's logits.
        temperature: ``T > 0``; both logits are divided by it.

    Returns:
        A 0-d tensor, ``T**2 mean_i sum_k p_ik (log p_ik - log q_ik)`` with ``p``
        the base and ``q`` the student probabilities at temperature ``T``.

    Raises:
        ValueError: If the logits are not 2-D, their shapes differ, or
            ``temperature`` is not a finite number > 0.
    """
    if student_logits.ndim != 2 or student_logits.shape != base_logits.shape:
        raise ValueError(
            "student_logits and base_logits must both have shape (example, class); got "
            f"{tuple(student_logits.shape)} and {tuple(base_logits.shape)}. Flatten token "
            "dimensions into the example dimension first."
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    kl = kl_divergence(student_logits / temperature, base_logits / temperature)
    return kl * temperature**2
