"""Subliminal learning in a small language model (Cloud et al. 2025's number setting), on gradlens.

A tiny Llama-style model with random weights is pretrained on synthetic number
sequences and questions (:mod:`~subliminal_lm.setting`): that base is the
shared initialisation. A teacher is fine-tuned from it to answer every question
with one answer word (the trait); it samples number sequences from number-only
prompts, filtered to number tokens only; students are fine-tuned on them with
a probed step every step (:mod:`~subliminal_lm.student`, a plain loop, or
:mod:`~subliminal_lm.hf_student`, ``transformers.Trainer`` with gradlens's
callback), under the
conditions of :mod:`~subliminal_lm.conditions`. gradlens never imports this
package; ``experiments/lm_subliminal.py`` maps its flags onto an
:class:`LMConfig` and runs :func:`main`.
"""

from __future__ import annotations

from subliminal_lm.conditions import CONDITIONS, Condition, get_conditions
from subliminal_lm.config import (
    DEFAULT_CONDITIONS,
    LORA_TARGETS,
    PRESETS,
    LMConfig,
    preset,
    quick,
)
from subliminal_lm.figures import FIGURES, draw_figure, draw_figures, save_figure, save_figures
from subliminal_lm.hf_student import StudentRecords, run_student_hf, student_arguments
from subliminal_lm.models import (
    ModelSize,
    build_model,
    clone_model,
    continuation_labels,
    flat_params,
    model_device,
    sample,
    train_plain,
    trait_probs,
    weights,
)
from subliminal_lm.report import condition_values, summary_markdown, token_dot_mean
from subliminal_lm.run import (
    COMBINED,
    COMPACT,
    SEED_RECORDS,
    STUDENT_TRAINERS,
    combine,
    compact,
    main,
    part_path,
    seed_values,
    settings_key,
    write_combined,
)
from subliminal_lm.setting import (
    Setting,
    build_setting,
    generate_numbers,
    pretrain_base,
    train_teacher,
)
from subliminal_lm.student import (
    EXTRA_RECORDS,
    Student,
    log_final,
    log_student_step,
    mean_trait_prob,
    run_student,
    student_after,
    student_coords,
    student_data,
    student_layout,
    student_model,
    student_params,
    student_variables,
    trait_objective,
)
from subliminal_lm.vocab import IGNORE, Vocab

__all__ = [
    "COMBINED",
    "COMPACT",
    "CONDITIONS",
    "DEFAULT_CONDITIONS",
    "EXTRA_RECORDS",
    "FIGURES",
    "IGNORE",
    "LORA_TARGETS",
    "PRESETS",
    "SEED_RECORDS",
    "STUDENT_TRAINERS",
    "Condition",
    "LMConfig",
    "ModelSize",
    "Setting",
    "Student",
    "StudentRecords",
    "Vocab",
    "build_model",
    "build_setting",
    "clone_model",
    "combine",
    "compact",
    "condition_values",
    "continuation_labels",
    "draw_figure",
    "draw_figures",
    "flat_params",
    "generate_numbers",
    "get_conditions",
    "log_final",
    "log_student_step",
    "main",
    "mean_trait_prob",
    "model_device",
    "part_path",
    "preset",
    "pretrain_base",
    "quick",
    "run_student",
    "run_student_hf",
    "sample",
    "save_figure",
    "save_figures",
    "seed_values",
    "settings_key",
    "student_after",
    "student_arguments",
    "student_coords",
    "student_data",
    "student_layout",
    "student_model",
    "student_params",
    "student_variables",
    "summary_markdown",
    "token_dot_mean",
    "train_plain",
    "train_teacher",
    "trait_objective",
    "trait_probs",
    "weights",
    "write_combined",
]
