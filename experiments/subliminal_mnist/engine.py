"""Distil a stack of students under one condition, probing and recording every step.

Every model of the stack (its own initialisation, teacher and noise) is
distilled at once by gradlens's stacked step
(:func:`subliminal_mnist.stacked_step.stacked_step`, the experiment's
objectives for :func:`gradlens.training.stacked_probed_step`); each record has
a ``model`` dim after ``step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradlens.records.recorder import Recorder, Variable
from gradlens.training import (
    TransformLayout,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.training.liminal import liminal_schedule
from gradlens.transforms import per_model
from subliminal_mnist.conditions import Condition
from subliminal_mnist.data import Digits
from subliminal_mnist.noise import NoiseStream
from subliminal_mnist.stacked import model_params, stack_forward
from subliminal_mnist.stacked_step import DistillBatch, TraitProbes, stacked_step
from subliminal_mnist.student import StudentSetup, student_transforms
from subliminal_mnist.teachers import EVAL_METRICS, evaluate_stack

__all__ = ["liminal_at", "make_optimizer", "run_students", "stack_coords", "stack_variables"]

OPTIONAL = ("momentum_cosine", "heldout_trait_loss", "heldout_cosine", "heldout_update_cosine")
"""The core step's optional records this experiment asks for (held-out ones at eval steps)."""

DISTILL_LOSS = ("distillation loss on the step's noise batch, before the step", "nat")

LIMINAL_PARTS: dict[str, tuple[str, str]] = {
    "liminal_kl_loss": ("liminal term T^2 KL(base || student), unweighted, before the step", "nat"),
    "distill_cosine": ("cos(g_t, gradient of the distillation loss alone)", "1"),
    "liminal_kl_cosine": ("cos(g_t, gradient of the liminal KL term alone)", "1"),
    "distill_norm": ("norm of the gradient of the distillation loss alone", "1"),
    "liminal_kl_norm": ("norm of the gradient of the liminal KL term alone, unweighted", "1"),
}
"""The records of a liminal condition's two loss terms taken apart (every step)."""


def stack_variables(condition: Condition, layout: TransformLayout | None) -> dict[str, Variable]:
    """Declare every record of a stacked student run (dims ``step, model, ...``)."""
    v = step_variables(layout, optional=OPTIONAL, models=True)
    for name, (long_name, units) in {"distill_loss": DISTILL_LOSS, **EVAL_METRICS}.items():
        v[name] = Variable(("step", "model"), long_name, units)
    v["test_accuracy"] = Variable(
        ("step", "model"), "student test accuracy after the step (class logits)"
    )
    v["epoch"] = Variable(("step",), "epoch of the step", dtype="int64", coord=True)
    if condition.liminal:
        v["liminal_weight"] = Variable(("step",), "liminal KL weight lambda(t)")
        for name, (long_name, units) in LIMINAL_PARTS.items():
            v[name] = Variable(("step", "model"), long_name, units)
    return v


def stack_coords(
    layers: Sequence[str], layout: TransformLayout | None, models: Sequence[int], examples: int
) -> dict[str, list]:
    """The Recorder coords of :func:`stack_variables`."""
    return step_coords(layers, layout, models=models, example_models=models[:examples])


def make_optimizer(
    condition: Condition, params: Sequence[Tensor], setup: StudentSetup
) -> torch.optim.Optimizer:
    """The condition's optimizer over the stacked parameters."""
    if condition.optimizer == "adam":
        return torch.optim.Adam(params, lr=setup.lr)
    if condition.optimizer == "adam_beta1_0":
        return torch.optim.Adam(params, lr=setup.lr, betas=(0.0, 0.999))
    if condition.optimizer == "sgd":
        return torch.optim.SGD(params, lr=setup.sgd_lr)
    if condition.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=setup.sgd_lr, momentum=setup.momentum)
    raise ValueError(
        f"condition {condition.name!r} names optimizer {condition.optimizer!r}; "
        "choose 'adam', 'adam_beta1_0', 'sgd' or 'sgd_momentum'."
    )


def liminal_at(condition: Condition, step: int, setup: StudentSetup) -> tuple[float, float]:
    """The liminal term's weight and temperature at ``step`` (0 and 1 without one).

    The weight is :func:`gradlens.training.liminal.liminal_schedule` of the condition's
    schedule with ``lambda_0 = setup.liminal_lambda0``, epochs of
    ``setup.steps_per_epoch`` steps and ``setup.steps`` steps in all; the
    temperature is the condition's, else ``setup.liminal_temperature`` (2, as published).
    """
    if condition.liminal is None:
        return 0.0, 1.0
    weight = liminal_schedule(
        condition.liminal,
        step=step,
        steps_per_epoch=setup.steps_per_epoch,
        total_steps=setup.steps,
        lambda_0=setup.liminal_lambda0,
    )
    temperature = condition.liminal_temperature or setup.liminal_temperature
    return weight, temperature


def run_students(
    condition: Condition,
    init: Mapping[str, Tensor],
    teachers: Mapping[str, Tensor],
    noise: NoiseStream,
    probes: TraitProbes,
    test: Digits,
    recorder: Recorder,
    *,
    setup: StudentSetup,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Distil every student of a stack from its teacher on noise, recording every step.

    Args:
        condition: What is distilled, with which optimizer and interventions.
        init: The students' initialisations, ``name -> (model, ...)`` (also the
            base models of a liminal term).
        teachers: The trained teachers, model ``m`` teaching student ``m``.
        noise: The noise batches (one per model per step).
        probes: The trait probe images (and held-out and shuffled-label ones).
        test: The test digits.
        recorder: Declared with :func:`stack_variables` and :func:`stack_coords`.
        setup: Hyper-parameters (``epochs``, ``eval_every``, ``store_every``, ...).
        progress: Show a progress bar.

    Returns:
        The trained students' parameters.
    """
    if setup.trait != "ce":
        raise ValueError(
            f"the stacked engine measures the trait as cross-entropy on the probe labels; "
            f"got trait={setup.trait!r}. Use trait='ce' (--trait ce)."
        )
    params = {n: v.detach().clone().requires_grad_(True) for n, v in init.items()}
    base = {n: v.detach() for n, v in init.items()}
    models = next(iter(params.values())).shape[0]
    optimizer = make_optimizer(condition, list(params.values()), setup)
    before, after = student_transforms(condition, noise.steps_per_epoch)
    layout = transform_layout(model_params(base, 0), before, after)
    # A loop over the models, not vmap: remove_random's torch.Generator cannot be
    # vmapped, and on the CPU the loop is also the faster (161 against 411 ms an update
    # for remove_aligned(scope="layer") at 25 models, measured for per_model).
    before = per_model(before, vectorize=False) if before is not None else None
    after = per_model(after, vectorize=False) if after is not None else None
    before_state = before.init(base) if before is not None else None
    after_state = after.init(base) if after is not None else None
    first = setup.num_classes if condition.logits == "aux" else 0
    covered = setup.num_classes if condition.liminal_logits == "class" else None
    examples = min(setup.example_models, models)
    steps = setup.epochs * noise.steps_per_epoch
    step = 0
    with tqdm(total=steps, desc=condition.name, disable=not progress, leave=False) as bar:
        for epoch in range(setup.epochs):
            for x in noise.batches(epoch):
                x = x.to(next(iter(base.values())).dtype)
                weight, temperature = liminal_at(condition, step, setup)
                last = step == steps - 1
                evaluate = step % setup.eval_every == 0 or last
                with torch.no_grad():
                    targets = stack_forward(teachers, x)[..., first:]
                    base_logits = None
                    if condition.liminal:  # at weight 0 too: its records need the term
                        base_logits = stack_forward(base, x)[..., :covered]
                result = stacked_step(
                    params,
                    optimizer,
                    DistillBatch(x, targets, first, base_logits, weight, temperature),
                    probes,
                    num_classes=setup.num_classes,
                    before=before,
                    before_state=before_state,
                    after=after,
                    after_state=after_state,
                    use_shuffled_reference=condition.reference == "shuffled",
                    heldout=evaluate,
                    step=step,
                )
                before_state, after_state = result.before_state, result.after_state
                values: dict[str, object] = dict(step_values(result, layout))
                if condition.liminal:
                    values["liminal_weight"] = weight
                if evaluate:
                    values |= evaluate_stack(params, test, setup.num_classes)
                if step % setup.store_every == 0 or last:
                    cosines = result.example_cosine[:examples]
                    pad = noise.batch_size - cosines.shape[1]
                    values["example_cosine"] = torch.nn.functional.pad(
                        cosines, (0, pad), value=float("nan")
                    )
                recorder.log(step, epoch=epoch, **values)
                bar.update()
                step += 1
    return {n: p.detach() for n, p in params.items()}
