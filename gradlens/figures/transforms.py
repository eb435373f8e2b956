"""The figure of what a transform did to the cosine with the reference (private).

Re-exported by :mod:`gradlens.figures.plots`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from gradlens.figures.layout import check_layout, check_rest, groups_of
from gradlens.stats import mean_ci

__all__ = ["plot_transform_cosine"]


def plot_transform_cosine(
    ds: xr.Dataset,
    var: str = "transform_cosine",
    *,
    hue: str | None = "condition",
    group: str = "all",
    replicate: str | None = "seed",
    level: float = 0.95,
    before: bool = True,
) -> Figure:
    """The cosine with the reference *after* each transform (solid), and before it (dashed).

    Reads the transform records of a probed step (docs/recording.md):
    ``var`` with dims ``(step, placement, transform, stage, group)`` and
    optionally ``hue`` and ``replicate``. For each ``hue`` value the one
    ``(placement, transform)`` that was recorded (the others are NaN) is
    drawn; a ``hue`` value with several must be narrowed with ``ds.sel`` first.

    Args:
        ds: A run's Dataset.
        var: The staged transform record, ``transform_cosine`` by default.
        hue: A dim to draw one colour per value of, e.g. ``"condition"``.
        group: The ``group`` value: ``"all"`` (global) or a layer name.
        replicate: A dim to average over with a Student-t band, when ``var`` has it.
        level: Confidence level of the band.
        before: Also draw the cosine of the incoming gradient, dashed.

    Raises:
        ValueError: ``var`` is missing or lacks a dim, ``group`` is not a
            ``group`` value, or a ``hue`` value recorded several transforms.
    """
    who = "plot_transform_cosine"
    dims = ["step", "placement", "transform", "stage", "group"] + ([hue] if hue else [])
    da = check_layout(ds, var, dims, who=who)
    if group not in [str(v) for v in da["group"].values]:
        raise ValueError(f"{who}: group {group!r} is not one of {da['group'].values.tolist()}.")
    da = da.sel(group=group)
    averaged = replicate if replicate in da.dims else None
    check_rest(da, ["step", "placement", "transform", "stage", hue, averaged], who, "hue")
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(groups_of(da, hue)):
        values = _the_recorded_transform(values, who, name)
        for stage, style in (("after", "-"), ("before", "--")):
            if stage == "before" and not before:
                continue
            line = values.sel(stage=stage).dropna("step", how="all")
            label = f"{name}, {stage}" if name is not None else stage
            if averaged:
                ci = mean_ci(line, dim=averaged, level=level)
                ax.plot(line.step, ci["mean"], style, color=f"C{i}", lw=1.1, label=label)
                if stage == "after":
                    ax.fill_between(line.step, ci["lower"], ci["upper"], color=f"C{i}", alpha=0.2)
            else:
                ax.plot(line.step, line, style, color=f"C{i}", lw=1.1, label=label)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine with the reference [dimensionless]")
    ax.legend(fontsize="x-small", ncol=2, title=hue, title_fontsize="x-small")
    band = f"; mean and {level:.0%} CI over {averaged}s" if averaged else ""
    where = "all parameters" if group == "all" else f"layer {group}"
    fig.suptitle(
        f"cosine with the reference after the transform (solid) and before (dashed)\n{where}{band}",
        fontsize="medium",
    )
    return fig


def _the_recorded_transform(values: xr.DataArray, who: str, name: str | None) -> xr.DataArray:
    """The one ``(placement, transform)`` slice with a finite value, as ``(step, stage, ...)``."""
    recorded = values.notnull().any([d for d in values.dims if d not in ("placement", "transform")])
    pairs = [
        (str(p), str(t))
        for p, t in zip(
            *np.nonzero(recorded.transpose("placement", "transform").values), strict=True
        )
        for p, t in [(values.placement.values[p], values.transform.values[t])]
    ]
    if len(pairs) != 1:
        what = f" for {name!r}" if name is not None else ""
        raise ValueError(
            f"{who}: {len(pairs)} (placement, transform) pairs were recorded{what}: {pairs}. "
            "Pick one with ds.sel(placement=..., transform=...) first."
        )
    return values.sel(placement=pairs[0][0], transform=pairs[0][1])
