"""Distil a stack of students under one condition, probing and recording every step.

The stacked counterpart of :func:`gradlens.mnist.run_student`: every model of
the stack (its own initialisation, teacher and noise) is distilled at once by
:func:`~gradlens.mnist.stacked_step.stacked_step`, and each record gets a
``model`` dim after ``step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from gradlens.liminal import liminal_schedule
from gradlens.recording import Recorder, Variable
from gradlens.training import (
    StepResult,
    TransformLayout,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.transforms import per_model
from subliminal_mnist.conditions import Condition
from subliminal_mnist.data import Digits
from subliminal_mnist.noise import NoiseStream
from subliminal_mnist.stacked import stack_forward, unstack
from subliminal_mnist.stacked_step import DistillBatch, TraitProbes, stacked_step
from subliminal_mnist.student import StudentSetup, student_transforms
from subliminal_mnist.teachers import EVAL_METRICS, evaluate_stack

__all__ = ["liminal_at", "make_optimizer", "run_students", "stack_coords", "stack_variables"]

STEP_EXTRA: dict[str, tuple[str, str]] = {
    "distill_loss": ("distillation loss on the step's noise batch, before the step", "nat"),
    "applied_cosine": ("cos(g_t, gradient handed to the optimizer), after any transform", "1"),
    "momentum_cosine": ("cos(g_t, optimizer first moment after the step); NaN for SGD", "1"),
    "heldout_trait_loss": ("trait loss on the held-out probe images, before the step", "nat"),
    # The held-out records are measured at the evaluation steps only (NaN elsewhere).
    "heldout_cosine": ("cos(g_h, g): held-out trait gradient and training gradient", "1"),
    "heldout_update_cosine": ("cos(g_h, applied update); < 0 teaches the held-out trait", "1"),
}


def _with_model(var: Variable) -> Variable:
    dims = (var.dims[0], "model", *var.dims[1:])
    return Variable(dims, var.long_name, var.units, var.dtype, var.coord)


def stack_variables(condition: Condition, layout: TransformLayout | None) -> dict[str, Variable]:
    """Declare every record of a stacked student run (dims ``step, model, ...``)."""
    base = step_variables(layout)
    example = base.pop("example_cosine")
    v = {name: _with_model(var) for name, var in base.items()}
    v["example_cosine"] = Variable(("example_step", "example_model", "example"), example.long_name)
    for name, (long_name, units) in {**STEP_EXTRA, **EVAL_METRICS}.items():
        v[name] = Variable(("step", "model"), long_name, units)
    v["test_accuracy"] = Variable(
        ("step", "model"), "student test accuracy after the step (class logits)"
    )
    v["epoch"] = Variable(("step",), "epoch of the step", dtype="int64", coord=True)
    if condition.liminal:
        v["liminal_weight"] = Variable(("step",), "liminal KL weight lambda(t)")
    return v


def stack_coords(
    layers: Sequence[str], layout: TransformLayout | None, models: Sequence[int], examples: int
) -> dict[str, list]:
    """The Recorder coords of :func:`stack_variables`."""
    return {
        **step_coords(layers, layout),
        "model": list(models),
        "example_model": list(models[:examples]),
    }


def make_optimizer(
    condition: Condition, params: Sequence[Tensor], setup: StudentSetup
) -> torch.optim.Optimizer:
    """The condition's optimizer over the stacked parameters."""
    if condition.optimizer == "adam":
        return torch.optim.Adam(params, lr=setup.lr)
    if condition.optimizer == "sgd":
        return torch.optim.SGD(params, lr=setup.sgd_lr)
    if condition.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=setup.sgd_lr, momentum=setup.momentum)
    raise ValueError(
        f"condition {condition.name!r} names optimizer {condition.optimizer!r}; "
        "choose 'adam', 'sgd' or 'sgd_momentum'."
    )


def liminal_at(condition: Condition, step: int, setup: StudentSetup) -> tuple[float, float]:
    """The liminal term's weight and temperature at ``step`` (0 and 1 without one).

    The weight is :func:`gradlens.liminal.liminal_schedule` of the condition's
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
    before, after = student_transforms(condition)
    layout = transform_layout(unstack(base, 0), before, after)
    # A loop over the models, not vmap: remove_random's torch.Generator cannot be
    # vmapped, and on the CPU the loop is also the faster (161 against 411 ms an update
    # for remove_aligned(scope="layer") at 25 models, measured for per_model).
    before = per_model(before, vectorize=False) if before is not None else None
    after = per_model(after, vectorize=False) if after is not None else None
    before_state = before.init(base) if before is not None else None
    after_state = after.init(base) if after is not None else None
    first = setup.num_classes if condition.logits == "aux" else 0
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
                    base_logits = (
                        stack_forward(base, x)[..., : setup.num_classes] if weight > 0 else None
                    )
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
                values: dict[str, object] = dict(result.records)
                if layout is not None:
                    values |= _transform_values(before_state, after_state, models, layout)
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


def _transform_values(
    before_state: object, after_state: object, models: int, layout: TransformLayout
) -> dict[str, Tensor]:
    """Each model's transform fields, stacked along a leading ``model`` dim."""

    def model_of(state: object, m: int) -> object:
        return None if state is None else pytree.tree_map_only(Tensor, lambda t: t[m], state)

    rows = [
        step_values(
            StepResult({}, torch.empty(0), model_of(before_state, m), model_of(after_state, m)),
            layout,
        )
        for m in range(models)
    ]
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
