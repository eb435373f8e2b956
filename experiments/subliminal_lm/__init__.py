"""Subliminal learning in a small language model (Cloud et al. 2025's number setting), on gradlens.

A tiny Llama-style model with random weights is pretrained on synthetic number
sequences and questions (:mod:`~subliminal_lm.setting`): that base is the
shared initialisation. A teacher is fine-tuned from it to answer every question
with one answer word (the trait); it samples number sequences from number-only
prompts, filtered to number tokens only; students are fine-tuned on them with
a probed step every step (:mod:`~subliminal_lm.student`), under the
conditions of :mod:`~subliminal_lm.conditions`. gradlens never imports this
package; ``experiments/lm_subliminal.py`` maps its flags onto an
:class:`LMConfig` and runs :func:`main`.
"""

from __future__ import annotations

from subliminal_lm.conditions import CONDITIONS, Condition, get_conditions
from subliminal_lm.config import DEFAULT_CONDITIONS, LMConfig, quick
from subliminal_lm.figures import draw_figure, save_figure
from subliminal_lm.models import (
    ModelSize,
    build_model,
    clone_model,
    continuation_labels,
    flat_params,
    sample,
    train_plain,
    trait_probs,
)
from subliminal_lm.report import condition_values, summary_markdown
from subliminal_lm.run import (
    COMBINED,
    COMPACT,
    SEED_RECORDS,
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
    run_student,
    student_coords,
    student_layout,
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
    "IGNORE",
    "SEED_RECORDS",
    "Condition",
    "LMConfig",
    "ModelSize",
    "Setting",
    "Vocab",
    "build_model",
    "build_setting",
    "clone_model",
    "combine",
    "compact",
    "condition_values",
    "continuation_labels",
    "draw_figure",
    "flat_params",
    "generate_numbers",
    "get_conditions",
    "main",
    "part_path",
    "pretrain_base",
    "quick",
    "run_student",
    "sample",
    "save_figure",
    "seed_values",
    "settings_key",
    "student_coords",
    "student_layout",
    "student_variables",
    "summary_markdown",
    "train_plain",
    "train_teacher",
    "trait_objective",
    "trait_probs",
    "write_combined",
]
