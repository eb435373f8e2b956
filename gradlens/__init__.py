"""gradlens: per-example gradient probes, alignment records and gradient interventions.

The package is laid out by stage, in the order data flows through a probed step:

- :mod:`gradlens.probes`: per-example gradients (``vmap``) and the factored
  ("ghost") path for exact per-example dots and norms, with its registry of
  forms (:mod:`gradlens.probes.forms`);
- :mod:`gradlens.alignment`: gradient-dict algebra and the alignment statistics;
- :mod:`gradlens.transforms`: interventions as ``(init, update)`` pairs;
- :mod:`gradlens.training`: the one step body and its modes (one model, a
  stack of models, data parallel), objectives and liminal training;
- :mod:`gradlens.records`: labelled runs written incrementally to netCDF, provenance;
- :mod:`gradlens.figures`: figures of runs;
- :mod:`gradlens.sweeps` and :mod:`gradlens.stats`: many runs, and statistics over them.

This face holds the names most users need; everything else is public in its
stage's package.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from gradlens._moved import install as _install_moved
from gradlens._version import __version__
from gradlens.alignment import alignment, example_alignment
from gradlens.errors import GradlensError
from gradlens.probes import ghost_plan, per_example_dots, per_example_grads, probe_batch
from gradlens.records import Recorder, Variable, open_run
from gradlens.training import (
    Objective,
    Stack,
    StepResult,
    distributed_probed_step,
    probed_step,
    stack_modules,
    stacked_probed_step,
)
from gradlens.transforms import (
    GradientTransform,
    chain,
    named_chain,
    per_model,
    remove_aligned,
    remove_random,
    reverse_aligned,
    scale_aligned,
)

_install_moved()

__all__ = [
    "GradientTransform",
    "GradlensError",
    "Objective",
    "Recorder",
    "Stack",
    "StepResult",
    "Variable",
    "__version__",
    "alignment",
    "chain",
    "distributed_probed_step",
    "example_alignment",
    "ghost_plan",
    "named_chain",
    "open_run",
    "per_example_dots",
    "per_example_grads",
    "per_model",
    "probe_batch",
    "probed_step",
    "remove_aligned",
    "remove_random",
    "reverse_aligned",
    "scale_aligned",
    "stack_modules",
    "stacked_probed_step",
]

_ELSEWHERE: dict[str, str] = {
    "Alignment": "gradlens.alignment",
    "ExampleAlignment": "gradlens.alignment",
    "summarize": "gradlens.alignment",
    "LayerStats": "gradlens.alignment",
    "layer_stats": "gradlens.alignment",
    "DamagedDataError": "gradlens.errors",
    "DataNotFoundError": "gradlens.errors",
    "GradientMismatchError": "gradlens.errors",
    "NonFiniteGradientError": "gradlens.errors",
    "RecordWriteError": "gradlens.errors",
    "UnsupportedModelError": "gradlens.errors",
    "PlanEntry": "gradlens.probes",
    "Probe": "gradlens.probes",
    "mean_grad": "gradlens.probes",
    "per_example_losses": "gradlens.probes",
    "flush_denormal": "gradlens.numerics",
    "RunProvenance": "gradlens.records",
    "config_from_attrs": "gradlens.records",
    "make_attrs": "gradlens.records",
    "run_provenance": "gradlens.records",
    "gather_examples": "gradlens.training",
    "identity": "gradlens.transforms",
    "remove_aligned_per_example": "gradlens.transforms",
    "reverse_aligned_per_example": "gradlens.transforms",
    "scale_aligned_per_example": "gradlens.transforms",
    "transform_records": "gradlens.transforms",
}
"""Names that left the top level (still importable from there, with a warning, for a release)."""


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        home = _ELSEWHERE[name]
        warnings.warn(
            f"gradlens.{name} moved off the top level: import it from {home} (the old name "
            "goes in the next release; docs/api.md lists every move).",
            DeprecationWarning,
            stacklevel=2,
        )
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value  # warned once: from-imports look a name up twice
        return value
    raise AttributeError(f"module 'gradlens' has no attribute {name!r}")
