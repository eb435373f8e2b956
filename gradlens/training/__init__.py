"""The probed training step and the definition of what it records."""

from __future__ import annotations

from gradlens.training.body import StepResult
from gradlens.training.distributed import (
    ReplicaDivergenceError,
    distributed_probed_step,
    gather_examples,
)
from gradlens.training.objective import Objective, weighted_sum
from gradlens.training.records import (
    STEP_RECORDS,
    TransformLayout,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.training.step import probed_step

__all__ = [
    "STEP_RECORDS",
    "Objective",
    "ReplicaDivergenceError",
    "StepResult",
    "TransformLayout",
    "distributed_probed_step",
    "gather_examples",
    "probed_step",
    "step_coords",
    "step_values",
    "step_variables",
    "transform_layout",
    "weighted_sum",
]
