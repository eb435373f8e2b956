"""How a student is distilled and probed, and the transforms of its condition."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gradlens.transforms import (
    GradientTransform,
    conditionally_transform,
    named_chain,
    steps_between,
)
from subliminal_mnist.conditions import Condition

__all__ = ["StudentSetup", "student_transforms"]


@dataclass(frozen=True)
class StudentSetup:
    """How a student is distilled and probed.

    Attributes:
        epochs: Passes over the noise set.
        batch_size: Noise images per step.
        noise_per_epoch: Noise images per epoch.
        lr: Adam learning rate.
        num_classes: Class logits; the rest are auxiliary.
        trait: Trait loss: cross-entropy on the probe labels (``"ce"``) or KL to
            the teacher's class distribution on the probe images (``"kl"``).
        eval_every: Test accuracy every this many steps (and after the last).
        store_every: Full per-example cosines every this many steps.
        liminal_lambda0: The liminal schedule's ``lambda_0`` (published default 1).
        liminal_period: Unused, and ``None``: the one-model loop that read it is
            gone (the stacked engine's schedules run over ``steps_per_epoch``
            and ``steps``). Kept so that the stored config of every run, and
            the resumption of earlier runs, stay as they were.
        liminal_temperature: The liminal term's temperature where the condition
            names none (2, as published).
        noise: ``"fixed"``: one set of ``noise_per_epoch`` images per model,
            reshuffled every epoch (the original's); ``"fresh"``: new images every batch.
        sgd_lr: Learning rate of the ``sgd`` and ``sgd_momentum`` conditions.
        momentum: Momentum of the ``sgd_momentum`` condition.
        example_models: Models (the first ones of a stack) whose every per-example
            cosine is stored every ``store_every`` steps; all models get the summaries.
    """

    epochs: int = 5
    batch_size: int = 1024
    noise_per_epoch: int = 60_000
    lr: float = 3e-4
    num_classes: int = 10
    trait: Literal["ce", "kl"] = "ce"
    eval_every: int = 10
    store_every: int = 10
    liminal_lambda0: float = 1.0
    liminal_period: int | None = None
    liminal_temperature: float = 2.0
    noise: Literal["fixed", "fresh"] = "fixed"
    sgd_lr: float = 0.1
    momentum: float = 0.9
    example_models: int = 2

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last batch may be smaller)."""
        return -(-self.noise_per_epoch // self.batch_size)

    @property
    def steps(self) -> int:
        """Optimizer steps in the whole run."""
        return self.epochs * self.steps_per_epoch


def student_transforms(
    condition: Condition, steps_per_epoch: int | None = None
) -> tuple[GradientTransform | None, GradientTransform | None]:
    """The condition's transforms before and after the optimizer, named after the condition.

    Args:
        condition: The condition.
        steps_per_epoch: Optimizer steps per epoch; needed when the condition's
            transforms act in some epochs only (``condition.active_epochs``), whose
            transforms then act on steps ``start * steps_per_epoch`` to
            ``stop * steps_per_epoch - 1`` (:func:`gradlens.transforms.steps_between`).

    Raises:
        ValueError: For a condition with ``active_epochs`` and no ``steps_per_epoch``.
    """

    def make(factory: Callable[[], GradientTransform] | None) -> GradientTransform | None:
        if factory is None:
            return None
        transform = factory()
        if condition.active_epochs is not None:
            if steps_per_epoch is None:
                raise ValueError(
                    f"condition {condition.name!r} acts in epochs {condition.active_epochs} "
                    "only: pass steps_per_epoch to student_transforms."
                )
            start, stop = condition.active_epochs
            active = steps_between(
                start * steps_per_epoch, None if stop is None else stop * steps_per_epoch
            )
            transform = conditionally_transform(transform, active)
        return named_chain((condition.name, transform))

    return make(condition.before), make(condition.after)
