"""gradlens: per-example gradient probes, alignment records and gradient interventions."""

from __future__ import annotations

from gradlens._version import __version__
from gradlens.alignment import Alignment, ExampleAlignment, alignment, example_alignment, summarize
from gradlens.errors import (
    DataNotFoundError,
    GradientMismatchError,
    GradlensError,
    NonFiniteGradientError,
    RecordWriteError,
    UnsupportedModelError,
)
from gradlens.ghost import PlanEntry, Probe, ghost_plan, per_example_dots, probe_batch
from gradlens.layerstats import LayerStats, layer_stats
from gradlens.numerics import flush_denormal
from gradlens.per_example import mean_grad, per_example_grads, per_example_losses
from gradlens.provenance import RunProvenance, config_from_attrs, make_attrs, run_provenance
from gradlens.recording import Recorder, Variable, open_run
from gradlens.training import Objective, StepResult, probed_step
from gradlens.transforms import (
    GradientTransform,
    chain,
    identity,
    named_chain,
    per_model,
    remove_aligned,
    remove_aligned_per_example,
    remove_random,
    reverse_aligned,
    reverse_aligned_per_example,
    scale_aligned,
    scale_aligned_per_example,
    transform_records,
)

__all__ = [
    "Alignment",
    "DataNotFoundError",
    "ExampleAlignment",
    "GradientMismatchError",
    "GradientTransform",
    "GradlensError",
    "LayerStats",
    "NonFiniteGradientError",
    "Objective",
    "PlanEntry",
    "Probe",
    "RecordWriteError",
    "Recorder",
    "RunProvenance",
    "StepResult",
    "UnsupportedModelError",
    "Variable",
    "__version__",
    "alignment",
    "chain",
    "config_from_attrs",
    "example_alignment",
    "flush_denormal",
    "ghost_plan",
    "identity",
    "layer_stats",
    "make_attrs",
    "mean_grad",
    "named_chain",
    "open_run",
    "per_example_dots",
    "per_example_grads",
    "per_example_losses",
    "per_model",
    "probe_batch",
    "probed_step",
    "remove_aligned",
    "remove_aligned_per_example",
    "remove_random",
    "reverse_aligned",
    "reverse_aligned_per_example",
    "run_provenance",
    "scale_aligned",
    "scale_aligned_per_example",
    "summarize",
    "transform_records",
]
