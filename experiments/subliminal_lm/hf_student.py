"""The student trained by ``transformers.Trainer`` with gradlens's callback: the loop's rows.

:func:`run_student_hf` trains the student of :func:`~subliminal_lm.run_student`
through a :class:`gradlens.integrations.hf.ProbedTrainer` (a ``Trainer`` with
the per-example pass) and a :class:`~gradlens.integrations.hf.GradlensCallback`
holding a :class:`~gradlens.integrations.TrainerProbe` (the trait objective,
the condition's ``after`` transform). The trainer reads the same sequences in
the same order (``train_sampling_strategy="sequential"``, one micro-batch per
step), minimises the same loss (``compute_loss_func``:
:func:`~gradlens.training.losses.token_mean`) with the condition's optimizer
at a constant learning rate and no clipping, and :class:`StudentRecords`, a
callback after gradlens's, logs each step's row with
:func:`~subliminal_lm.student.log_student_step` from the probe's
:attr:`~gradlens.integrations.TrainerProbe.result`: the rows of the loop.
``tests/lm/test_lm_trainer.py`` checks the two against each other.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import (
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from gradlens import Recorder
from gradlens.integrations import TrainerProbe
from gradlens.integrations.hf import GradlensCallback, ProbedTrainer
from gradlens.training import Objective, TransformLayout
from gradlens.training.losses import token_mean
from subliminal_lm.conditions import Condition
from subliminal_lm.config import LMConfig
from subliminal_lm.models import Params, model_device, weights
from subliminal_lm.setting import Setting
from subliminal_lm.student import (
    Student,
    log_final,
    log_student_step,
    make_optimizer,
    mean_trait_prob,
    student_after,
    student_data,
    student_layout,
    student_model,
    student_params,
    trait_objective,
)

__all__ = ["StudentRecords", "run_student_hf", "student_arguments"]


class _Rows(Dataset):
    """The rows of a ``{"input_ids", "labels"}`` dict, one sequence each."""

    def __init__(self, data: dict[str, Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def _loss(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
    """The trainer's loss: the loop's :func:`token_mean` of the logits."""
    del num_items_in_batch  # each sequence's mean, then the mean: no token count needed
    return token_mean(outputs.logits, labels)


def _examples(batch: dict[str, Tensor]) -> Objective:
    """The micro-batch as the per-example pass sees it (the loop's training objective)."""
    return Objective.from_batch(token_mean, batch)


class StudentRecords(TrainerCallback):
    """Logs each step's row of the student's run file (after the gradlens callback).

    At ``on_step_begin`` it takes ``trait_prob`` and the parameters; at
    ``on_step_end`` (after the probe's ``after`` transform) it logs the probe's
    step result and :data:`~subliminal_lm.student.EXTRA_RECORDS` with
    :func:`~subliminal_lm.student.log_student_step`.

    Args:
        probe: The gradlens callback's probe (its last step's result is logged).
        recorder: The student's recorder.
        setting: The seed's setting.
        config: The sizes.
        start: The student's initial weights (:func:`~subliminal_lm.models.weights`).
        layout: :func:`~subliminal_lm.student_layout` of the student's trained parameters.
    """

    def __init__(
        self,
        probe: TrainerProbe,
        recorder: Recorder,
        setting: Setting,
        config: LMConfig,
        start: Params,
        layout: TransformLayout,
    ) -> None:
        self.probe = probe
        self.recorder = recorder
        self.setting = setting
        self.config = config
        self.start = start
        self.layout = layout
        self._prob: Tensor | None = None
        self._previous: Params | None = None

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """The trait probability and the parameters before the step."""
        assert model is not None
        self._prob = mean_trait_prob(model, self.setting, self.config)
        self._previous = weights(model)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Log the step's row (``global_step`` has counted the step)."""
        probe, previous, prob = self.probe, self._previous, self._prob
        assert model is not None and probe.result is not None
        assert previous is not None and prob is not None
        log_student_step(
            self.recorder,
            state.global_step - 1,
            probe.result,
            self.layout,
            trait_prob=prob,
            previous=previous,
            now=weights(model),
            start=self.start,
            displacement=self.setting.displacement,
        )


def student_arguments(model: torch.nn.Module, config: LMConfig, out: str) -> TrainingArguments:
    """The trainer's arguments for the loop's schedule.

    One micro-batch of ``student_batch`` sequences per step, in order, for
    ``student_steps`` steps; the optimizer's own learning rate, constant; no
    clipping, logging, saving or reporting; ``config.device`` (``use_cpu`` for the CPU).

    Raises:
        ValueError: If the trainer would train on another device than the model's
            (``transformers.Trainer`` uses the first visible GPU), or on several
            GPUs at once (it would wrap the model in ``DataParallel``).
    """
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=config.student_batch,
        gradient_accumulation_steps=1,
        max_steps=config.student_steps,
        train_sampling_strategy="sequential",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=torch.device(config.device).type == "cpu",
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    device = model_device(model)
    if args.device != device or args.n_gpu > 1:
        raise ValueError(
            f"transformers.Trainer would train on {args.device} ({args.n_gpu} GPUs), not on the "
            f"model's device {device}: it uses the first visible GPU alone; run with "
            f"CUDA_VISIBLE_DEVICES set to that one GPU and --device cuda, or --trainer loop."
        )
    return args


def run_student_hf(
    setting: Setting, condition: Condition, config: LMConfig, recorder: Recorder
) -> Student:
    """Train one student through ``transformers.Trainer``: the rows of :func:`run_student`.

    Args:
        setting: The seed's bases, teacher and data.
        condition: How the student starts, what it reads and how it steps.
        config: The sizes.
        recorder: Declared with :func:`~subliminal_lm.student_variables` and
            :func:`~subliminal_lm.student_coords`.

    Returns:
        The trained student and its final trait probability.
    """
    model = student_model(setting, condition, config)
    optimizer = make_optimizer(condition, model, config)
    probe = TrainerProbe(  # record=False: StudentRecords logs each row, with its own records
        trait_objective(setting, config),
        after=student_after(condition),
        output="logits",
        record=False,
    )
    callback = GradlensCallback(probe)
    layout = student_layout(student_params(model))
    records = StudentRecords(probe, recorder, setting, config, weights(model), layout)
    with tempfile.TemporaryDirectory() as out, torch.random.fork_rng():
        # the Trainer reseeds the global generators (torch's is restored after); the
        # student draws from none of them (no dropout, the data are fixed)
        trainer = ProbedTrainer(
            model=model,
            args=student_arguments(model, config, out),
            train_dataset=_Rows(student_data(setting, condition, config)),
            optimizers=(optimizer, None),
            compute_loss_func=_loss,
            callbacks=[records],
            gradlens=callback,
            examples=_examples,
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training log
        trainer.train()
    return log_final(recorder, model, setting, config)
