"""The performance targets of the probe benchmark, reported as measured, never asserted.

At batch 1024 on the experiment's MLP: ``per_example_grads`` within 2x of the
plain backward and no slower than Opacus or BackPACK; the ghost
``per_example_dots`` within 1.5x of the plain backward in time and in peak
memory.
"""

from __future__ import annotations

import math

import xarray as xr

__all__ = ["targets_markdown"]

MODEL, BATCH = "mlp", 1024


def _value(ds: xr.Dataset, var: str, method: str) -> float:
    if method not in ds["method"].values:
        return math.nan
    at = ds.sel({"model": MODEL, "batch": BATCH, "method": method})
    return float(at[var].item()) if at["status"].item() == "ok" else math.nan


def _row(target: str, measured: float, limit: float, unit: str = "x") -> str:
    if math.isnan(measured):
        return f"| {target} | not measured | - |"
    met = "met" if measured <= limit else "missed"
    return f"| {target} | {measured:.2f}{unit} | {met} |"


def targets_markdown(ds: xr.Dataset) -> str:
    """A markdown table of the targets with the measured ratios; empty if not measured."""
    if MODEL not in ds["model"].values or BATCH not in ds["batch"].values:
        return ""
    grads = _value(ds, "time_median", "pe_grads")
    lines = [
        f"### Targets ({MODEL}, B={BATCH})",
        "",
        "| target | measured | |",
        "|---|---:|---|",
        _row("per_example_grads time <= 2x plain", _value(ds, "time_ratio", "pe_grads"), 2.0),
    ]
    for rival in ("opacus", "backpack"):
        lines.append(
            _row(
                f"per_example_grads time <= {rival} time",
                grads / _value(ds, "time_median", rival),
                1.0,
                unit=f"x {rival}",
            )
        )
    for var, what in (("time_ratio", "time"), ("memory_ratio", "peak memory")):
        lines.append(
            _row(f"ghost per_example_dots {what} <= 1.5x plain", _value(ds, var, "dots_ghost"), 1.5)
        )
    return "\n".join(lines) + "\n"
