"""The probed student loop: one :func:`gradlens.training.probed_step` per step, every step recorded.

The loop is plain PyTorch; :mod:`subliminal_lm.hf_student` trains the same
student through ``transformers.Trainer`` with gradlens's callback. What both
share is here: the student's start, data and transform, the trait objective,
and the row each step logs (:func:`log_student_step`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import peft
import torch
import transformers
from torch import Tensor

from gradlens import Recorder
from gradlens.alignment.gradops import cosine, group_by_layer, norm, sub
from gradlens.records import Variable
from gradlens.training import (
    Objective,
    StepResult,
    TransformLayout,
    probed_step,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.training.losses import token_losses, token_mean
from gradlens.transforms import GradientTransform, named_chain, remove_aligned
from subliminal_lm.conditions import Condition
from subliminal_lm.config import LMConfig
from subliminal_lm.models import (
    Params,
    clone_model,
    continuation_labels,
    trait_probs,
    weights,
)
from subliminal_lm.setting import Setting

__all__ = [
    "EXTRA_RECORDS",
    "REMOVE_NAME",
    "Student",
    "log_final",
    "log_student_step",
    "make_optimizer",
    "mean_trait_prob",
    "run_student",
    "student_after",
    "student_coords",
    "student_data",
    "student_layout",
    "student_model",
    "student_params",
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
"""What the LM experiment records beside the probed step's own records.

All in the full weights' coordinates (:func:`~subliminal_lm.models.weights`,
LoRA adapters merged in), those of the teacher's displacement."""

LORA_SEED_OFFSET = 20_000
"""A LoRA student's adapters start from the random weights of seed ``seed + LORA_SEED_OFFSET``."""


def student_layout(params: Mapping[str, Tensor]) -> TransformLayout:
    """The transform layout every condition shares (NaN where a condition has no transform)."""
    layout = transform_layout(params, after=named_chain((REMOVE_NAME, remove_aligned())))
    assert layout is not None
    return layout


def student_variables(layout: TransformLayout, *, token_dots: bool = False) -> dict[str, Variable]:
    """The Recorder variables of one student: the step's records plus :data:`EXTRA_RECORDS`.

    With ``token_dots`` also ``token_dot`` ``(step, example, token)``
    (:attr:`LMConfig.token_dots <subliminal_lm.LMConfig>`).
    """
    optional = ("token_dot",) if token_dots else ()
    return {**step_variables(layout, optional=optional), **EXTRA_RECORDS}


def student_coords(params: Mapping[str, Tensor], layout: TransformLayout) -> dict[str, list]:
    """The Recorder coords of one student (layers are module prefixes)."""
    return step_coords(list(group_by_layer(params)), layout)


def trait_objective(setting: Setting, config: LMConfig) -> Objective:
    """The trait loss ``-log p(trait answer | question)`` on the probe questions, on the device."""
    vocab = config.vocab
    questions = setting.questions[setting.probe]
    answers = torch.full((len(questions),), vocab.trait)
    batch = vocab.answered(questions, answers)
    return Objective.from_batch(token_mean, {k: v.to(config.device) for k, v in batch.items()})


def make_optimizer(
    condition: Condition, model: torch.nn.Module, config: LMConfig
) -> torch.optim.Optimizer:
    """The condition's optimizer over ``model``'s trainable parameters."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if condition.optimizer == "sgd":
        return torch.optim.SGD(trained, lr=config.sgd_lr)
    betas = (0.0, 0.999) if condition.optimizer == "adam_beta1_0" else (0.9, 0.999)
    lr = config.lora_lr if condition.trains == "lora" else config.lr
    return torch.optim.Adam(trained, lr=lr, betas=betas)


class Student(NamedTuple):
    """A trained student.

    Attributes:
        model: The student after its last step.
        trait_prob: Its final trait probability (the last row of ``trait_prob``).
    """

    model: torch.nn.Module
    trait_prob: float


def student_model(
    setting: Setting, condition: Condition, config: LMConfig
) -> transformers.LlamaForCausalLM | peft.PeftModel:
    """A fresh copy of the base the condition starts from; LoRA-wrapped for a ``lora`` condition.

    A LoRA student's base weights are frozen and its adapters (rank
    ``config.lora_rank`` on ``config.lora_targets``) start with ``B = 0``, so it
    computes what its base does; ``A`` is drawn from the seed's own generator.
    """
    model = clone_model(setting.base if condition.init == "same" else setting.other)
    if condition.trains == "full":
        return model
    lora = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
    )
    with torch.random.fork_rng():
        torch.manual_seed(setting.seed + LORA_SEED_OFFSET)
        return peft.get_peft_model(model, lora).eval()


def student_params(model: torch.nn.Module) -> dict[str, Tensor]:
    """The parameters the student trains (and gradlens probes), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def student_data(setting: Setting, condition: Condition, config: LMConfig) -> dict[str, Tensor]:
    """The student's sequences in training order: ``{"input_ids", "labels"}``.

    Each is ``(sequence, token)``, on the CPU. Step ``k`` trains on rows ``k * student_batch``
    to ``(k + 1) * student_batch``; the labels are -100 over the prompt (the loss
    is on the sampled tokens). The first ``config.sequences`` sequences of the
    condition's source, repeated ``config.student_epochs`` times in the same order.
    """
    data = setting.teacher_numbers if condition.data == "teacher" else setting.base_numbers
    ids = data[: config.sequences].repeat(config.student_epochs, 1)
    return {"input_ids": ids, "labels": continuation_labels(ids, 2 + config.prompt_numbers)}


def student_after(condition: Condition) -> GradientTransform | None:
    """The condition's transform of the update, named as :func:`student_layout` declares it."""
    return None if condition.after is None else named_chain((REMOVE_NAME, condition.after()))


def mean_trait_prob(model: torch.nn.Module, setting: Setting, config: LMConfig) -> Tensor:
    """``trait_prob``: p(trait answer | question), the mean over every question."""
    return trait_probs(model, config.vocab, setting.questions)[:, config.vocab.trait].mean()


def log_student_step(
    recorder: Recorder,
    step: int,
    result: StepResult,
    layout: TransformLayout,
    *,
    trait_prob: Tensor,
    previous: Params,
    now: Params,
    start: Params,
    displacement: Params,
) -> None:
    """Log one student step's row: the probed step's records and :data:`EXTRA_RECORDS`.

    Args:
        recorder: Declared with :func:`student_variables` and :func:`student_coords`.
        step: The step (the row).
        result: The step's result.
        layout: :func:`student_layout` of the student's parameters.
        trait_prob: :func:`mean_trait_prob` before the step.
        previous: The weights before the step (:func:`~subliminal_lm.models.weights`).
        now: The weights after it.
        start: The student's initial weights.
        displacement: The teacher's displacement from the base.
    """
    update, drift = sub(now, previous), sub(now, start)
    recorder.log(
        step,
        **step_values(result, layout),
        example_cosine=result.example_cosine,
        trait_prob=trait_prob,
        teacher_cosine=cosine(update, displacement),
        drift_cosine=cosine(drift, displacement),
        update_norm=norm(update),
        drift_norm=norm(drift),
    )


def log_final(
    recorder: Recorder, model: torch.nn.Module, setting: Setting, config: LMConfig
) -> Student:
    """Log the last row (``trait_prob`` after the last step) and return the student."""
    final = mean_trait_prob(model, setting, config)
    recorder.log(config.student_steps, trait_prob=final)
    return Student(model, float(final))  # type: ignore[arg-type]


def run_student(
    setting: Setting, condition: Condition, config: LMConfig, recorder: Recorder
) -> Student:
    """Train one student in a plain loop, a probed step every step, logging each step's row.

    Row ``k`` holds the records of step ``k`` (measured before its update, as
    :func:`~gradlens.training.probed_step` gives them) and ``trait_prob`` before
    it; one last row ``config.student_steps`` holds the final ``trait_prob``.
    :func:`~subliminal_lm.hf_student.run_student_hf` trains the same student
    through ``transformers.Trainer`` (the same rows).

    Args:
        setting: The seed's bases, teacher and data.
        condition: How the student starts, what it reads and how it steps.
        config: The sizes.
        recorder: Declared with :func:`student_variables` and :func:`student_coords`.

    Returns:
        The trained student and its final trait probability.
    """
    model = student_model(setting, condition, config)
    data = student_data(setting, condition, config)
    optimizer = make_optimizer(condition, model, config)
    params = student_params(model)
    layout = student_layout(params)
    after = student_after(condition)
    after_state = None if after is None else after.init(params)
    trait = trait_objective(setting, config)
    token_loss = token_losses if config.token_dots else None
    start: Params = weights(model)
    batch = config.student_batch
    for step in range(config.student_steps):
        rows = slice(step * batch, (step + 1) * batch)
        step_data = {k: v[rows].to(config.device) for k, v in data.items()}
        train = Objective.from_batch(token_mean, step_data)
        prob = mean_trait_prob(model, setting, config)
        previous = weights(model)
        result = probed_step(
            model,
            optimizer,
            train,
            trait,
            after=after,
            after_state=after_state,
            step=step,
            output="logits",
            token_loss=token_loss,
        )
        after_state = result.after_state
        log_student_step(
            recorder,
            step,
            result,
            layout,
            trait_prob=prob,
            previous=previous,
            now=weights(model),
            start=start,
            displacement=setting.displacement,
        )
    return log_final(recorder, model, setting, config)
