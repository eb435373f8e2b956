"""The MNIST auxiliary-logit setting of subliminal learning (Cloud et al. 2025), on the core.

A teacher MLP with ``10 + m`` outputs learns MNIST on its 10 class logits; a
student from the same initialisation is distilled only on the ``m`` auxiliary
logits, on uniform noise images, and is then tested on digits.

Everything specific to that setting lives here, built on the generic core:
the data (:mod:`~gradlens.mnist.data`), models, noise and losses, the teacher,
the conditions (interventions) and the probed student loop, combining runs,
and the run's figures and summary. The core never imports this package; vary
the setting by passing your own :class:`~gradlens.mnist.student.StudentSetup`,
:class:`~gradlens.mnist.conditions.Condition` or sizes, or copy a module.
``experiments/mnist_aux.py`` is the script that strings the pieces together.
"""

from __future__ import annotations

from gradlens.mnist.conditions import (
    BASE_CONDITIONS,
    CAUSAL_CONDITIONS,
    CONDITIONS,
    Condition,
    get_conditions,
)
from gradlens.mnist.data import Digits, load_mnist
from gradlens.mnist.experiment import combine_runs, cross_seed, probe_subset, run_condition
from gradlens.mnist.figures import draw_figures, plot_final_vs_alignment, save_figures
from gradlens.mnist.losses import class_cross_entropy, class_kl, logit_kl
from gradlens.mnist.models import init_mlp
from gradlens.mnist.noise import noise_batch
from gradlens.mnist.report import summary_markdown
from gradlens.mnist.resume import (
    check_settings,
    part_path,
    reusable_parts,
    write_combined,
    write_summary,
)
from gradlens.mnist.student import StudentSetup, run_student, student_variables
from gradlens.mnist.teacher import accuracy, train_classifier

__all__ = [
    "BASE_CONDITIONS",
    "CAUSAL_CONDITIONS",
    "CONDITIONS",
    "Condition",
    "Digits",
    "StudentSetup",
    "accuracy",
    "check_settings",
    "class_cross_entropy",
    "class_kl",
    "combine_runs",
    "cross_seed",
    "draw_figures",
    "get_conditions",
    "init_mlp",
    "load_mnist",
    "logit_kl",
    "noise_batch",
    "part_path",
    "plot_final_vs_alignment",
    "probe_subset",
    "reusable_parts",
    "run_condition",
    "run_student",
    "save_figures",
    "student_variables",
    "summary_markdown",
    "train_classifier",
    "write_combined",
    "write_summary",
]
