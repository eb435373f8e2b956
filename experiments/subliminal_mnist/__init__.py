"""The MNIST auxiliary-logit setting of subliminal learning (Cloud et al. 2025), on gradlens.

A teacher MLP with ``10 + m`` outputs learns MNIST on its 10 class logits; a
student from the same initialisation is distilled only on the ``m`` auxiliary
logits, on uniform noise images, and is then tested on digits.

Everything specific to that setting lives here, a client of the library that
is not installed with it: the scripts in ``experiments/`` import it from
beside them. The data (:mod:`~subliminal_mnist.data`), models, noise and
losses, the teachers, the conditions (interventions), the stacked probed
student loop, the experiment's orchestration (:func:`run_experiment`, parts
run here or as submitit jobs), and the run's figures and summary. gradlens
never imports this package; vary the setting by passing your own
:class:`~subliminal_mnist.student.StudentSetup`,
:class:`~subliminal_mnist.conditions.Condition` or sizes, or copy a module.
``experiments/mnist_aux.py`` maps its flags onto a config and runs
:func:`run_experiment`.
"""

from __future__ import annotations

from subliminal_mnist.blocks import (
    TeacherBlock,
    combine_blocks,
    cross_models,
    load_or_train_teachers,
    model_seeds,
    run_block_condition,
    teacher_metrics,
    teachers_path,
    trait_probes,
)
from subliminal_mnist.compact import compact_results, write_compact
from subliminal_mnist.conditions import (
    BASE_CONDITIONS,
    CAUSAL_CONDITIONS,
    CONDITIONS,
    CONTROL_CONDITIONS,
    LIMINAL_CONDITIONS,
    MECHANISM_CONDITIONS,
    Condition,
    get_conditions,
)
from subliminal_mnist.data import Digits, load_mnist
from subliminal_mnist.dispatch import (
    EXECUTORS,
    Dispatch,
    PartSettings,
    run_part,
    run_parts,
    run_seed,
)
from subliminal_mnist.engine import run_students, stack_coords, stack_variables
from subliminal_mnist.figures import draw_figures, plot_final_vs_alignment, save_figures
from subliminal_mnist.losses import class_cross_entropy, logit_kl
from subliminal_mnist.models import init_mlp
from subliminal_mnist.noise import NOISE_KINDS, NoiseStream, noise_batch
from subliminal_mnist.report import final_values, headline_table, summary_markdown
from subliminal_mnist.resume import (
    check_device,
    check_settings,
    part_path,
    reusable_parts,
    write_combined,
    write_summary,
)
from subliminal_mnist.run import ExperimentConfig, check_run, run_experiment
from subliminal_mnist.stacked import init_stack, model_view, stack_forward
from subliminal_mnist.stacked_step import DistillBatch, TraitProbes, stacked_step
from subliminal_mnist.student import StudentSetup
from subliminal_mnist.teacher import accuracy, train_classifier
from subliminal_mnist.teachers import evaluate_stack, train_teacher_stack

__all__ = [
    "BASE_CONDITIONS",
    "CAUSAL_CONDITIONS",
    "CONDITIONS",
    "CONTROL_CONDITIONS",
    "EXECUTORS",
    "LIMINAL_CONDITIONS",
    "MECHANISM_CONDITIONS",
    "NOISE_KINDS",
    "Condition",
    "Digits",
    "Dispatch",
    "DistillBatch",
    "ExperimentConfig",
    "NoiseStream",
    "PartSettings",
    "StudentSetup",
    "TeacherBlock",
    "TraitProbes",
    "accuracy",
    "check_device",
    "check_run",
    "check_settings",
    "class_cross_entropy",
    "combine_blocks",
    "compact_results",
    "cross_models",
    "draw_figures",
    "evaluate_stack",
    "final_values",
    "get_conditions",
    "headline_table",
    "init_mlp",
    "init_stack",
    "load_mnist",
    "load_or_train_teachers",
    "logit_kl",
    "model_seeds",
    "model_view",
    "noise_batch",
    "part_path",
    "plot_final_vs_alignment",
    "reusable_parts",
    "run_block_condition",
    "run_experiment",
    "run_part",
    "run_parts",
    "run_seed",
    "run_students",
    "save_figures",
    "stack_coords",
    "stack_forward",
    "stack_variables",
    "stacked_step",
    "summary_markdown",
    "teacher_metrics",
    "teachers_path",
    "train_classifier",
    "train_teacher_stack",
    "trait_probes",
    "write_combined",
    "write_compact",
    "write_summary",
]
