"""Per-example probes: gradients by ``vmap``, dots and norms by factored forms.

- :mod:`gradlens.probes.vmap`: per-example gradients and losses (``torch.func``);
- :mod:`gradlens.probes.ghost`: :func:`per_example_dots` and :func:`probe_batch`,
  exact per-example inner products and squared norms without materialising
  per-example gradients where a factored form applies;
- :mod:`gradlens.probes.plan`: which path each parameter takes, and why
  (:func:`ghost_plan`);
- :mod:`gradlens.probes.capture`: the ghost pass that captures layer inputs
  and output gradients;
- :mod:`gradlens.probes.forms`: the factored forms and their registry
  (:func:`~gradlens.probes.forms.register_form`);
- :mod:`gradlens.probes.outputs`: which tensor of a model's output the loss sees;
- :mod:`gradlens.probes.loop`: per-example gradients one example at a time, where
  ``vmap`` cannot batch the forward (fused RNNs, packed sequences);
- :mod:`gradlens.probes.precision`: float32 accumulation in reduced precision and the
  cosines' noise floor (:class:`~gradlens.errors.PrecisionWarning`).
- :mod:`gradlens.probes.tokens`: :func:`token_dots`, each token's loss term
  against a reference gradient (token-level alignment).
"""

from __future__ import annotations

from gradlens.probes.forms import register_form
from gradlens.probes.ghost import Method, Probe, per_example_dots, probe_batch
from gradlens.probes.outputs import OutputSelector
from gradlens.probes.plan import PlanEntry, ghost_plan
from gradlens.probes.tokens import token_dots
from gradlens.probes.vmap import (
    LossFn,
    Randomness,
    loss_and_grad,
    mean_grad,
    per_example_grads,
    per_example_losses,
)

__all__ = [
    "LossFn",
    "Method",
    "OutputSelector",
    "PlanEntry",
    "Probe",
    "Randomness",
    "ghost_plan",
    "loss_and_grad",
    "mean_grad",
    "per_example_dots",
    "per_example_grads",
    "per_example_losses",
    "probe_batch",
    "register_form",
    "token_dots",
]
