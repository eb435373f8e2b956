"""The probed student loop: one :func:`gradlens.training.probed_step` per step, every step recorded.

The loop is plain PyTorch so that it can later be replaced by a
``transformers.Trainer`` with gradlens's trainer callback (the same
:class:`~gradlens.training.Objective` pair, the same records): the data, the
trait objective and the extra records below do not depend on the loop.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gradlens import Recorder
from gradlens.alignment.gradops import cosine, group_by_layer, norm, sub
from gradlens.records import Variable
from gradlens.training import (
    Objective,
    TransformLayout,
    probed_step,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.training.losses import token_mean
from gradlens.transforms import GradientTransform, named_chain, remove_aligned
from subliminal_lm.conditions import Condition
from subliminal_lm.config import LMConfig
from subliminal_lm.models import Params, clone_model, continuation_labels, flat_params, trait_probs
from subliminal_lm.setting import Setting

__all__ = [
    "EXTRA_RECORDS",
    "REMOVE_NAME",
    "make_optimizer",
    "run_student",
    "student_coords",
    "student_layout",
    "student_variables",
    "trait_objective",
]

REMOVE_NAME = "remove_update"
"""The ``transform`` coordinate of the one transform any condition uses."""

EXTRA_RECORDS: dict[str, Variable] = {
    "trait_prob": Variable(
        ("step",), "p(trait answer | question), mean over every question, before the step"
    ),
    "teacher_cosine": Variable(
        ("step",), "cos(update, teacher - base): the step along the teacher's displacement"
    ),
    "drift_cosine": Variable(("step",), "cos(student - its init, teacher - base) after the step"),
    "update_norm": Variable(("step",), "||update||, the step's parameter change"),
    "drift_norm": Variable(("step",), "||student - its init|| after the step"),
}
"""What the LM experiment records beside the probed step's own records."""


def student_layout(params: Mapping[str, Tensor]) -> TransformLayout:
    """The transform layout every condition shares (NaN where a condition has no transform)."""
    layout = transform_layout(params, after=named_chain((REMOVE_NAME, remove_aligned())))
    assert layout is not None
    return layout


def student_variables(layout: TransformLayout) -> dict[str, Variable]:
    """The Recorder variables of one student: the step's records plus :data:`EXTRA_RECORDS`."""
    return {**step_variables(layout), **EXTRA_RECORDS}


def student_coords(params: Mapping[str, Tensor], layout: TransformLayout) -> dict[str, list]:
    """The Recorder coords of one student (layers are module prefixes)."""
    return step_coords(list(group_by_layer(params)), layout)


def trait_objective(setting: Setting, config: LMConfig) -> Objective:
    """The trait loss ``-log p(trait answer | question)`` on the probe questions."""
    vocab = config.vocab
    questions = setting.questions[setting.probe]
    answers = torch.full((len(questions),), vocab.trait)
    return Objective.from_batch(token_mean, vocab.answered(questions, answers))


def make_optimizer(
    condition: Condition, model: torch.nn.Module, config: LMConfig
) -> torch.optim.Optimizer:
    """The condition's optimizer over ``model``'s parameters."""
    if condition.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.sgd_lr)
    betas = (0.0, 0.999) if condition.optimizer == "adam_beta1_0" else (0.9, 0.999)
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)


def _mean_trait_prob(model: torch.nn.Module, setting: Setting, config: LMConfig) -> Tensor:
    return trait_probs(model, config.vocab, setting.questions)[:, config.vocab.trait].mean()


def run_student(
    setting: Setting, condition: Condition, config: LMConfig, recorder: Recorder
) -> float:
    """Train one student with a probed step every step, logging each step's row.

    Row ``k`` holds the records of step ``k`` (measured before its update, as
    :func:`~gradlens.training.probed_step` gives them) and ``trait_prob`` before
    it; one last row ``config.student_steps`` holds the final ``trait_prob``.

    Args:
        setting: The seed's bases, teacher and data.
        condition: How the student starts, what it reads and how it steps.
        config: The sizes.
        recorder: Declared with :func:`student_variables` and :func:`student_coords`.

    Returns:
        The final trait probability.
    """
    model = clone_model(setting.base if condition.init == "same" else setting.other)
    data = setting.teacher_numbers if condition.data == "teacher" else setting.base_numbers
    optimizer = make_optimizer(condition, model, config)
    params = dict(model.named_parameters())
    layout = student_layout(params)
    after: GradientTransform | None = None
    after_state = None
    if condition.after is not None:
        after = named_chain((REMOVE_NAME, condition.after()))
        after_state = after.init(params)
    trait = trait_objective(setting, config)
    start: Params = flat_params(model)
    prompt = 2 + config.prompt_numbers
    batch = config.student_batch
    for step in range(config.student_steps):
        ids = data[step * batch : (step + 1) * batch]
        train = Objective.from_batch(
            token_mean, {"input_ids": ids, "labels": continuation_labels(ids, prompt)}
        )
        prob = _mean_trait_prob(model, setting, config)
        previous = flat_params(model)
        result = probed_step(
            model,
            optimizer,
            train,
            trait,
            after=after,
            after_state=after_state,
            step=step,
            output="logits",
        )
        after_state = result.after_state
        now = flat_params(model)
        update, drift = sub(now, previous), sub(now, start)
        recorder.log(
            step,
            **step_values(result, layout),
            example_cosine=result.example_cosine,
            trait_prob=prob,
            teacher_cosine=cosine(update, setting.displacement),
            drift_cosine=cosine(drift, setting.displacement),
            update_norm=norm(update),
            drift_norm=norm(drift),
        )
    final = _mean_trait_prob(model, setting, config)
    recorder.log(config.student_steps, trait_prob=final)
    return float(final)
