"""Distil one student under one condition, probing and recording every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradlens.gradops import group_by_layer
from gradlens.liminal import liminal_loss, liminal_weight
from gradlens.per_example import LossFn
from gradlens.recording import Recorder, Variable
from gradlens.training import (
    Objective,
    TransformLayout,
    probed_step,
    step_values,
    step_variables,
    transform_layout,
    weighted_sum,
)
from gradlens.transforms import GradientTransform, named_chain
from subliminal_mnist.conditions import Condition
from subliminal_mnist.data import Digits
from subliminal_mnist.losses import class_cross_entropy, class_kl, logit_kl
from subliminal_mnist.noise import noise_batch
from subliminal_mnist.teacher import accuracy

__all__ = ["StudentSetup", "run_student", "student_transforms", "student_variables"]


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
        liminal_period: For :func:`run_student` (one model, the ``"early_decay"``
            schedule only): steps over which the weight decays to 0; ``None``
            (default) is the first epoch, ``steps_per_epoch``.
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


def student_variables(
    condition: Condition, transforms: TransformLayout | None
) -> dict[str, Variable]:
    """Declare every record a student run writes: the probed step's and the experiment's.

    Args:
        condition: The condition, for the liminal weight.
        transforms: The condition's transform layout (:func:`student_transforms`).
    """
    s = ("step",)
    v = {
        **step_variables(transforms),
        "epoch": Variable(s, "epoch of the step", dtype="int64", coord=True),
        "distill_loss": Variable(s, "distillation loss on the step's noise batch", units="nat"),
        "test_accuracy": Variable(s, "student test accuracy after the step (class logits)"),
    }
    if condition.liminal:
        v["liminal_weight"] = Variable(s, "liminal KL weight lambda(t)")
    return v


def layer_names(model: nn.Module) -> list[str]:
    """Layer names of the model's trainable parameters, in order."""
    return list(group_by_layer(n for n, p in model.named_parameters() if p.requires_grad))


def student_transforms(
    condition: Condition,
) -> tuple[GradientTransform | None, GradientTransform | None]:
    """The condition's transforms before and after the optimizer, named after the condition."""
    before = named_chain((condition.name, condition.before())) if condition.before else None
    after = named_chain((condition.name, condition.after())) if condition.after else None
    return before, after


def run_student(
    student: nn.Module,
    teacher: nn.Module,
    base: nn.Module,
    condition: Condition,
    probe: Digits,
    test: Digits,
    recorder: Recorder,
    *,
    seed: int,
    setup: StudentSetup,
    progress: bool = True,
) -> nn.Module:
    """Distil ``student`` from ``teacher`` on noise, logging every step to ``recorder``.

    Args:
        student: The student, already at its initialisation; trained in place.
        teacher: The trained teacher.
        base: The student's initial model (the target of the liminal term).
        condition: What is distilled and which interventions apply.
        probe: Labelled images for the trait gradient (never trained on).
        test: Test images for accuracy.
        recorder: A :class:`~gradlens.recording.Recorder` declared with
            :func:`student_variables` and :func:`gradlens.training.step_coords`.
        seed: Seed of the noise stream.
        setup: Hyper-parameters.
        progress: Show a progress bar.

    Returns:
        The trained student.
    """
    if condition.liminal not in (None, "early_decay") or condition.optimizer != "adam":
        raise ValueError(
            f"run_student trains with Adam and the 'early_decay' liminal schedule only; condition "
            f"{condition.name!r} needs gradlens.mnist.run_students (the stacked engine)."
        )
    if condition.reference != "trait":
        raise ValueError(
            f"run_student acts along the trait gradient only; condition {condition.name!r} "
            "needs gradlens.mnist.run_students (the stacked engine)."
        )
    device = probe.images.device
    first = setup.num_classes if condition.logits == "aux" else 0
    distill = logit_kl(first)
    if setup.trait == "ce":
        trait = Objective(class_cross_entropy(setup.num_classes), probe.images, (probe.labels,))
    else:
        with torch.no_grad():
            teacher_classes = teacher(probe.images)[:, : setup.num_classes]
        trait = Objective(class_kl(setup.num_classes), probe.images, (teacher_classes,))
    optimizer = torch.optim.Adam(student.parameters(), lr=setup.lr)
    params = dict(student.named_parameters())
    before, after = student_transforms(condition)
    layout = transform_layout(params, before, after)
    before_state = before.init(params) if before else None
    after_state = after.init(params) if after else None

    step = 0
    with tqdm(total=setup.steps, desc=condition.name, disable=not progress, leave=False) as bar:
        for epoch in range(setup.epochs):
            for index in range(setup.steps_per_epoch):
                size = min(setup.batch_size, setup.noise_per_epoch - index * setup.batch_size)
                x = noise_batch(seed, epoch, index, size, probe.images.shape[1], str(device))
                with torch.no_grad():
                    targets = teacher(x)[:, first:]
                    base_logits = base(x)[:, : setup.num_classes] if condition.liminal else None
                loss_fn, all_targets, extra = distill, (targets,), {}
                if base_logits is not None:
                    weight = liminal_weight(
                        step,
                        lambda0=setup.liminal_lambda0,
                        period=setup.liminal_period or setup.steps_per_epoch,
                    )
                    loss_fn = weighted_sum(distill, _class_slice(setup.num_classes), weight, 1)
                    all_targets = (targets, base_logits)
                    extra = {"liminal_weight": weight}
                    if weight > 0:  # else the training loss is the distillation loss
                        with torch.no_grad():
                            extra["distill_loss"] = distill(student(x), targets)
                result = probed_step(
                    student,
                    optimizer,
                    Objective(loss_fn, x, all_targets),
                    trait,
                    before=before,
                    before_state=before_state,
                    after=after,
                    after_state=after_state,
                    step=step,
                )
                before_state, after_state = result.before_state, result.after_state
                values = step_values(result, layout)
                values["distill_loss"] = values["train_loss"]
                values.update(extra)
                last = step == setup.steps - 1
                if step % setup.eval_every == 0 or last:
                    values["test_accuracy"] = accuracy(student, test, setup.num_classes)
                if step % setup.store_every == 0 or last:
                    values["example_cosine"] = _pad(result.example_cosine, setup.batch_size)
                recorder.log(step, epoch=epoch, **values)
                bar.update()
                step += 1
    return student


def _pad(values: Tensor, size: int) -> Tensor:
    """Pad ``(example,)`` with NaN to ``size`` (the last batch of an epoch may be smaller)."""
    return torch.cat([values, values.new_full((size - len(values),), float("nan"))])


def _class_slice(num_classes: int) -> LossFn:
    """The ``"early_decay"`` term (T = 1) on the first ``num_classes`` logits.

    ``loss(outputs, base_logits)``.
    """

    def loss(outputs: Tensor, base_logits: Tensor) -> Tensor:
        return liminal_loss(outputs[:, :num_classes], base_logits, temperature=1.0)

    return loss
