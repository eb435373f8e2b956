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


def _row(target: str, measured: tuple[float, float], limit: float, unit: str = "x") -> str:
    cells = []
    for value in measured:
        if math.isnan(value):
            cells.append("-")
        else:
            cells.append(f"{value:.2f}{unit} ({'met' if value <= limit else 'missed'})")
    return f"| {target} | " + " | ".join(cells) + " |"


def targets_markdown(ds: xr.Dataset) -> str:
    """A markdown table of the targets with the measured ratios; empty if not measured.

    Time targets are given for the wall clock and, on CPU, for process CPU time.
    """
    if MODEL not in ds["model"].values or BATCH not in ds["batch"].values:
        return ""
    clocks = ("time_median", "cpu_time_median")
    lines = [
        f"### Targets ({MODEL}, B={BATCH})",
        "",
        "| target | wall clock | process CPU time |",
        "|---|---:|---:|",
        _row(
            "per_example_grads time <= 2x plain",
            tuple(_value(ds, c, "pe_grads") / _value(ds, c, "plain") for c in clocks),
            2.0,
        ),
    ]
    for rival in ("opacus", "backpack"):
        lines.append(
            _row(
                f"per_example_grads time <= {rival} time",
                tuple(_value(ds, c, "pe_grads") / _value(ds, c, rival) for c in clocks),
                1.0,
                unit=f"x {rival}",
            )
        )
    lines.append(
        _row(
            "ghost per_example_dots time <= 1.5x plain",
            tuple(_value(ds, c, "dots_ghost") / _value(ds, c, "plain") for c in clocks),
            1.5,
        )
    )
    memory = _value(ds, "peak_memory", "dots_ghost") / _value(ds, "peak_memory", "plain")
    lines.append(_row("ghost per_example_dots peak memory <= 1.5x plain", (memory, math.nan), 1.5))
    return "\n".join(lines) + "\n"
