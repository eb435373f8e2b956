"""gradlens: per-example gradient probes, alignment records and gradient interventions."""

from __future__ import annotations

from gradlens.alignment import Alignment, ExampleAlignment, alignment, example_alignment, summarize
from gradlens.data import Digits, load_mnist
from gradlens.errors import (
    DataNotFoundError,
    GradientMismatchError,
    GradlensError,
    NonFiniteGradientError,
    UnsupportedModelError,
)
from gradlens.ghost import Probe, per_example_dots, probe_batch
from gradlens.per_example import mean_grad, per_example_grads, per_example_losses

__version__ = "0.1.0"

__all__ = [
    "Alignment",
    "DataNotFoundError",
    "Digits",
    "ExampleAlignment",
    "GradientMismatchError",
    "GradlensError",
    "NonFiniteGradientError",
    "Probe",
    "UnsupportedModelError",
    "__version__",
    "alignment",
    "example_alignment",
    "load_mnist",
    "mean_grad",
    "per_example_dots",
    "per_example_grads",
    "per_example_losses",
    "probe_batch",
    "summarize",
]
