"""The probed training step and the definition of what it records."""

from __future__ import annotations

from gradlens.probes.deferred import CheckLedger, deferred_checks
from gradlens.training.amortise import TraitCache, reuse_trait
from gradlens.training.body import StepResult
from gradlens.training.distributed import (
    ReplicaDivergenceError,
    distributed_probed_step,
    gather_examples,
)
from gradlens.training.objective import Objective, weighted_sum
from gradlens.training.records import (
    OPTIONAL_RECORDS,
    STEP_RECORDS,
    TransformLayout,
    plan_attr,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.training.stack import Stack, stack_forward, stack_modules, unstack
from gradlens.training.stacked import stacked_probed_step
from gradlens.training.step import probed_step

__all__ = [
    "OPTIONAL_RECORDS",
    "STEP_RECORDS",
    "CheckLedger",
    "Objective",
    "ReplicaDivergenceError",
    "Stack",
    "StepResult",
    "TraitCache",
    "TransformLayout",
    "deferred_checks",
    "distributed_probed_step",
    "gather_examples",
    "plan_attr",
    "probed_step",
    "reuse_trait",
    "stack_forward",
    "stack_modules",
    "stacked_probed_step",
    "step_coords",
    "step_values",
    "step_variables",
    "transform_layout",
    "unstack",
    "weighted_sum",
]
