"""The one-minute table of the realistic models: what a probed step costs, beside GhostSuite's.

For each realistic model and batch size in a ``results.nc``, from the cases of
one run: the unprobed step's absolute time and peak memory, and as ratios to it
the unprobed step plus the trait gradient, the probed step, and the probed step
with the trait gradient taken every :data:`K` steps (``trait_cache=reuse_trait(K)``):
the mean over ``K`` steps of one probed step that takes ``g_t`` and ``K - 1`` that
reuse it, both measured (``step_probed`` and ``step_probed_reused``),
``(probed + (K - 1) * reused) / K``. A run without ``step_probed_reused`` (older
results) gets the earlier *model* instead, marked so: the probed step minus
``(K - 1) / K`` of the trait gradient's cost, ``probed - (K - 1) / K * (plain_trait -
unprobed)``.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from gradlens_bench.models import REALISTIC

__all__ = ["GHOSTSUITE", "K", "every_k", "realistic_markdown"]

K = 10
"""Steps between trait gradients in the modelled column."""

GHOSTSUITE = (
    "GhostSuite (published): exact per-example dots against a reference gradient at 1.40-1.50x "
    "regular training, reference backward included; Llama-3 130M, sequence 4096, one H200 "
    "(its compiled engine)"
)


_STEPS = ("step_unprobed", "step_plain_trait", "step_probed")
REUSED = "step_probed_reused"


def every_k(probed: float, reused: float, base: float, trait: float) -> float:
    """Seconds of a probed step with ``g_t`` every :data:`K` steps.

    From the measured reused step when there is one (``reused`` not NaN), else
    modelled from the trait gradient's cost (``trait - base``).
    """
    if not math.isnan(reused):
        return (probed + (K - 1) * reused) / K
    return probed - (K - 1) / K * (trait - base)


def _get(ds: xr.Dataset, var: str, model: str, batch: int, method: str) -> float:
    if method not in ds["method"].values:
        return math.nan
    at = ds.sel({"model": model, "batch": batch, "method": method})
    return float(at[var].item()) if at["status"].item() == "ok" else math.nan


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _row(ds: xr.Dataset, model: str, batch: int, clock: str) -> str:
    base, trait, probed = (_get(ds, clock, model, batch, m) for m in _STEPS)
    every = every_k(probed, _get(ds, clock, model, batch, REUSED), base, trait)
    memory = _get(ds, "peak_memory", model, batch, "step_probed") / _get(
        ds, "peak_memory", model, batch, "step_unprobed"
    )
    absolute = "-" if math.isnan(base) else f"{base * 1e3:.3g} ms"
    mib = _get(ds, "peak_memory", model, batch, "step_unprobed") / 2**20
    return (
        f"| {model} | {batch} | {absolute} | {'-' if math.isnan(mib) else f'{mib:.3g} MiB'} | "
        f"{_x(trait / base)} | {_x(probed / base)} | {_x(probed / trait)} | "
        f"{_x(every / base)} | {_x(memory)} |"
    )


def realistic_markdown(ds: xr.Dataset) -> str:
    """The realistic models' summary table of ``ds``; empty if it has none."""
    models = [m for m in REALISTIC if m in ds["model"].values]
    if not models or "step_unprobed" not in ds["method"].values:
        return ""
    cuda = str(ds.attrs.get("device", "")).startswith("cuda")
    steps = [m for m in _STEPS if m in ds["method"].values]
    cpu_times = ds["cpu_time_median"].sel({"model": models, "method": steps}).values
    clock = "cpu_time_median" if not cuda and bool(np.isfinite(cpu_times).all()) else "time_median"
    clock_name = "process CPU time" if clock == "cpu_time_median" else "wall clock"
    size = ds.attrs.get("realistic_size", "?")
    measured = REUSED in ds["method"].values
    how = "measured" if measured else "modelled"
    every = (
        f"Trait every {K} steps: the mean of one probed step and {K - 1} that reuse g_t, "
        "both measured."
        if measured
        else f"Trait every {K} steps: modelled (see the docs), not measured."
    )
    lines = [
        f"### Realistic models ({ds.attrs.get('device_name', '?')}, size {size!r})",
        "",
        f"Ratios to the unprobed step of the same run ({clock_name}"
        f"{'' if cuda else '; measured on a CPU, not GPU numbers'}). Trait batch: a quarter "
        f"of the training batch. {every}",
        "",
        "| model | B | unprobed step | its peak memory | + trait gradient | probed step | "
        f"probed / (+ trait) | probed, trait every {K} ({how}) | probed peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(ds, m, int(b), clock) for m in models for b in ds["batch"].values]
    lines += ["", f"For scale: {GHOSTSUITE}.", ""]
    return "\n".join(lines)
