"""The experiment's settings, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from subliminal_lm.models import ModelSize
from subliminal_lm.vocab import Vocab

__all__ = ["DEFAULT_CONDITIONS", "LORA_TARGETS", "PRESETS", "LMConfig", "preset", "quick"]

DEFAULT_CONDITIONS: tuple[str, ...] = (
    "same_init",
    "base_numbers",
    "cross_init",
    "sgd",
    "adam_beta1_0",
    "remove_update",
)
"""The conditions of the reduced run (:data:`~subliminal_lm.conditions.CONDITIONS` has more)."""

LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Every linear layer of the decoder blocks (not the embedding or ``lm_head``)."""


@dataclass(frozen=True)
class LMConfig:
    """Every setting of the language-model experiment; the defaults are the reduced CPU run.

    Attributes:
        seeds: Independent replicates: each its own base, other base, teacher and data.
        conditions: Names from :data:`~subliminal_lm.conditions.CONDITIONS`.
        vocab: The vocabulary (and which answer is the trait).
        size: The model's sizes.
        pretrain_steps: Adam steps of each base model's pretraining.
        pretrain_batch: Number sequences and questions per pretraining step.
        pretrain_lr: Its learning rate.
        teacher_steps: Adam steps of the teacher's fine-tune (trait answer plus numbers).
        teacher_lr: Its learning rate.
        prompt_numbers: Numbers in a number prompt.
        new_tokens: Tokens sampled after each prompt (all must be numbers to be kept).
        temperature: Sampling temperature.
        student_steps: Probed optimizer steps of each student.
        student_batch: Sequences per student step.
        student_epochs: Passes over the student's number data: a student trains on
            ``student_steps * student_batch / student_epochs`` distinct sequences
            (:attr:`sequences`), each seen ``student_epochs`` times, in the same order
            every pass. 1: every sequence seen once.
        lr: Adam learning rate of the students (and of ``adam_beta1_0``).
        sgd_lr: Learning rate of the ``sgd`` condition.
        probe_questions: Questions in the trait probe batch (the trait gradient).
        lora_rank: Rank of the ``lora`` conditions' adapters.
        lora_alpha: Their scale numerator (the update is ``alpha / rank * B A``).
        lora_targets: The Llama modules that get an adapter.
        lora_lr: Adam learning rate of the ``lora`` conditions (adapters are
            usually given a larger rate than full fine-tuning).
        token_dots: Record ``token_dot`` ``(step, example, token)``, each training
            token's loss term against ``g_t`` (``probed_step(token_loss=...)``);
            the loop only (``trainer="loop"``).
        out: Output folder.
        progress: Print one line per student.
        overwrite: Replace an existing run file.
        jobs: Seeds run at once, each in its own process with one thread.
        trainer: What trains the students: ``"hf"``, ``transformers.Trainer``
            with gradlens's callback (:func:`~subliminal_lm.hf_student.run_student_hf`),
            or ``"loop"``, a plain loop of :func:`gradlens.training.probed_step`
            (:func:`~subliminal_lm.student.run_student`, about 1.3 times faster);
            the same records.
        device: The torch device everything runs on (bases, teacher, sampling,
            students, either trainer); the data are drawn on the CPU, so a
            seed's data do not depend on it (its numbers, up to rounding, do not).
        preset: The ``--size`` preset the values started from (:func:`preset`), a
            label only: the other fields are what the run used.
    """

    seeds: int = 10
    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    vocab: Vocab = field(default_factory=Vocab)
    size: ModelSize = field(default_factory=ModelSize)
    pretrain_steps: int = 150
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    teacher_steps: int = 60
    teacher_lr: float = 1e-3
    prompt_numbers: int = 3
    new_tokens: int = 8
    temperature: float = 1.0
    student_steps: int = 100
    student_batch: int = 16
    student_epochs: int = 1
    lr: float = 1e-3
    sgd_lr: float = 0.1
    probe_questions: int = 64
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_lr: float = 3e-3
    token_dots: bool = False
    out: Path = Path("runs/lm_subliminal")
    progress: bool = True
    overwrite: bool = False
    jobs: int = 1
    trainer: Literal["loop", "hf"] = "hf"
    device: str = "cpu"
    preset: Literal["cpu", "gpu"] = "cpu"

    def __post_init__(self) -> None:
        rows = self.student_steps * self.student_batch
        if self.student_epochs < 1 or rows % self.student_epochs:
            raise ValueError(
                f"student_epochs={self.student_epochs} must be at least 1 and divide the "
                f"{rows} sequences a student reads (student_steps * student_batch); "
                "choose student_steps as a multiple of student_epochs."
            )
        if self.token_dots and self.trainer != "loop":
            raise ValueError(
                "token_dots records token_dot in the plain probed_step loop only; "
                'pass trainer="loop" (--trainer loop) or drop token_dots.'
            )

    @property
    def sequences(self) -> int:
        """Distinct sequences each student trains on (each seen ``student_epochs`` times)."""
        return self.student_steps * self.student_batch // self.student_epochs


def quick(config: LMConfig) -> LMConfig:
    """A reduced run for a smoke test: 3 seeds, 30 student steps."""
    return dataclasses.replace(config, seeds=3, teacher_steps=50, student_steps=30)


PRESETS: tuple[str, ...] = ("cpu", "gpu")
"""The ``--size`` presets of :func:`preset`."""


def preset(name: str) -> LMConfig:
    """The settings of a ``--size`` preset.

    ``"cpu"``: :class:`LMConfig`'s defaults, the reduced CPU run (the committed
    results). ``"gpu"``: a larger tiny Llama (width 256, 4 layers, MLP 512) pretrained
    longer on larger batches, a longer teacher fine-tune, and students of 300
    steps of 32 sequences (9,600 sequences each), probed on 128 questions.

    Raises:
        ValueError: An unknown name, listing :data:`PRESETS`.
    """
    if name == "cpu":
        return LMConfig()
    if name == "gpu":
        return LMConfig(
            size=ModelSize(hidden=256, intermediate=512, layers=4, heads=4),
            pretrain_steps=600,
            pretrain_batch=64,
            pretrain_lr=1e-3,
            teacher_steps=200,
            student_steps=300,
            student_batch=32,
            probe_questions=128,
            preset="gpu",
        )
    raise ValueError(f"unknown size preset {name!r}; choose from {list(PRESETS)}.")
