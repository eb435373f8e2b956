"""gradlens: per-example gradient probes, alignment records and gradient interventions."""

from __future__ import annotations

from gradlens.errors import (
    DataNotFoundError,
    GradientMismatchError,
    GradlensError,
    NonFiniteGradientError,
    UnsupportedModelError,
)
from gradlens.per_example import mean_grad, per_example_grads, per_example_losses

__version__ = "0.1.0"

__all__ = [
    "DataNotFoundError",
    "GradientMismatchError",
    "GradlensError",
    "NonFiniteGradientError",
    "UnsupportedModelError",
    "__version__",
    "mean_grad",
    "per_example_grads",
    "per_example_losses",
]
