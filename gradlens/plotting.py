"""Figures drawn from a combined run Dataset, so they can be redrawn from a saved file.

Every function takes the Dataset (dims ``step``, ``condition``, ``seed``, ...)
and returns a :class:`matplotlib.figure.Figure`; nothing here touches pyplot's
global state, so it works headless and inside other programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from gradlens.stats import mean_ci

__all__ = [
    "plot_example_histograms",
    "plot_final_vs_alignment",
    "plot_layer_heatmap",
    "plot_over_steps",
    "plot_predicted_vs_measured",
    "save_figures",
]


def _conditions(ds: xr.Dataset, conditions: Sequence[str] | None) -> list[str]:
    return list(conditions) if conditions is not None else [str(c) for c in ds.condition.values]


def plot_over_steps(
    ds: xr.Dataset,
    var: str,
    *,
    conditions: Sequence[str] | None = None,
    ylabel: str | None = None,
    zero_line: bool = False,
    panels: bool = False,
    logy: bool = False,
) -> Figure:
    """Mean over seeds with its 95% CI band, per condition.

    Steps where ``var`` was not measured (NaN for every seed) are skipped.

    Args:
        ds: Combined Dataset.
        var: Variable with a ``step`` dim.
        conditions: Which conditions, in order; default all.
        ylabel: Axis label; default the variable's ``long_name``.
        zero_line: Draw ``y = 0``.
        panels: One panel per condition with its own y range (for values of
            very different size), instead of one shared axis.
        logy: Logarithmic y axis (for losses).
    """
    names = _conditions(ds, conditions)
    rows = len(names) if panels else 1
    fig = Figure(figsize=(7, 3.5 if rows == 1 else 1.0 + 1.3 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i}" for i in range(len(names))]
    for i, condition in enumerate(names):
        ax = axes[i if panels else 0]
        da = ds[var].sel(condition=condition).dropna("step", how="all")
        ci = mean_ci(da)
        ax.plot(da.step, ci["mean"], label=condition, lw=1.2, color=colors[i])
        ax.fill_between(da.step, ci["lower"], ci["upper"], color=colors[i], alpha=0.2)
        if zero_line:
            ax.axhline(0.0, color="k", lw=0.6)
        if panels:
            ax.set_ylabel(condition, rotation=0, ha="right", va="center")
        if logy:
            ax.set_yscale("log")
    if not panels:
        axes[0].set_ylabel(ylabel or ds[var].attrs.get("long_name", var))
        axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("student step")
    fig.suptitle(f"{ylabel or ds[var].attrs.get('long_name', var)}: mean and 95% CI over seeds")
    return fig


def plot_layer_heatmap(
    ds: xr.Dataset, var: str = "layer_cosine", *, conditions: Sequence[str] | None = None
) -> Figure:
    """Per-layer values over steps, averaged over seeds: one panel per condition."""
    names = _conditions(ds, conditions)
    fig = Figure(figsize=(7, 1.2 + 1.0 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    mean = ds[var].mean("seed")
    limit = float(np.nanmax(np.abs(mean.sel(condition=names).values))) or 1.0
    for ax, condition in zip(axes, names, strict=True):
        values = mean.sel(condition=condition).transpose("layer", "step")
        image = ax.pcolormesh(
            values.step,
            np.arange(values.sizes["layer"]),
            values,
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            shading="nearest",
        )
        ax.set_yticks(np.arange(values.sizes["layer"]), [str(v) for v in values.layer.values])
        ax.set_ylabel(condition, rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("student step")
    fig.colorbar(image, ax=list(axes), label=ds[var].attrs.get("long_name", var))
    fig.suptitle(f"{ds[var].attrs.get('long_name', var)}, mean over seeds (rows: layers)")
    return fig


def plot_example_histograms(
    ds: xr.Dataset, *, conditions: Sequence[str] | None = None, bins: int = 50
) -> Figure:
    """Histograms of per-example cosines at an early, a middle and a late stored step.

    One row per condition (its own x range), one column per step; all seeds pooled.
    """
    names = _conditions(ds, conditions)
    stored = ds.example_step.values
    picks = [stored[0], stored[len(stored) // 2], stored[-1]]
    fig = Figure(figsize=(9, 1.0 + 1.4 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 3, sharey="row", squeeze=False)
    for row, condition in zip(axes, names, strict=True):
        values = ds["example_cosine"].sel(condition=condition)
        lim = float(np.nanquantile(np.abs(values.values), 0.995)) or 1.0
        edges = np.linspace(-lim, lim, bins + 1)
        for ax, step in zip(row, picks, strict=True):
            v = values.sel(example_step=step).values.ravel()
            ax.hist(v[np.isfinite(v)], bins=edges, color="C0", alpha=0.8)
            ax.axvline(0.0, color="k", lw=0.6)
            ax.tick_params(labelsize="small")
        row[0].set_ylabel(condition, rotation=0, ha="right", va="center")
    for ax, step in zip(axes[0], picks, strict=True):
        ax.set_title(f"step {int(step)}")
    for ax in axes[-1]:
        ax.set_xlabel("cos(g_i, g_t)")
    fig.suptitle("per-example alignment of distillation examples with g_t (counts, all seeds)")
    return fig


def plot_predicted_vs_measured(
    ds: xr.Dataset, *, conditions: Sequence[str] | None = None
) -> Figure:
    """First-order predicted trait-loss change ``g_t . delta`` against the measured one."""
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = np.inf, -np.inf
    for condition in _conditions(ds, conditions):
        p = ds["predicted_change"].sel(condition=condition).values.ravel()
        m = ds["measured_change"].sel(condition=condition).values.ravel()
        ok = np.isfinite(p) & np.isfinite(m)
        ax.scatter(p[ok], m[ok], s=4, alpha=0.4, label=condition)
        if ok.any():
            lo, hi = min(lo, p[ok].min(), m[ok].min()), max(hi, p[ok].max(), m[ok].max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.6, label="y = x")
    ax.set_xlabel("predicted change  g_t . delta")
    ax.set_ylabel("measured change of the trait loss")
    ax.legend(fontsize="small", markerscale=3)
    ax.set_title("trait-loss change per step, every seed")
    return fig


def plot_final_vs_alignment(
    ds: xr.Dataset,
    var: str = "cosine",
    *,
    conditions: Sequence[str] | None = None,
    xlabel: str | None = None,
) -> Figure:
    """Final student accuracy against the run's mean of ``var``, per condition (95% CIs).

    ``var="cosine"`` is the raw gradient alignment (measured before any
    intervention acts); ``var="update_cosine"`` is the alignment of the update
    actually applied, where interventions show.
    """
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    accuracy = ds["test_accuracy"].dropna("step", how="all").isel(step=-1)
    for condition in _conditions(ds, conditions):
        x = mean_ci(ds[var].sel(condition=condition).mean("step"))
        y = mean_ci(accuracy.sel(condition=condition))
        ax.errorbar(
            float(x["mean"]),
            float(y["mean"]),
            xerr=float(x["half_width"]),
            yerr=float(y["half_width"]),
            fmt="o",
            capsize=3,
            label=condition,
        )
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_xlabel(xlabel or f"mean {ds[var].attrs.get('long_name', var)} over the run")
    ax.set_ylabel("final student test accuracy")
    ax.legend(fontsize="small")
    ax.set_title("trait acquired against alignment (mean and 95% CI over seeds)")
    return fig


def save_figures(ds: xr.Dataset, out_dir: str | Path) -> list[Path]:
    """Draw the standard figures of a run and save them as PNG files in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "alignment.png": plot_over_steps(
            ds, "cosine", ylabel="cos(g_t, g_d)", zero_line=True, panels=True
        ),
        "accuracy.png": plot_over_steps(ds, "test_accuracy", ylabel="test accuracy"),
        "distill_loss.png": plot_over_steps(
            ds, "distill_loss", ylabel="distillation loss (nat)", logy=True
        ),
        "update_alignment.png": plot_over_steps(
            ds, "update_cosine", ylabel="cos(g_t, applied update)", zero_line=True, panels=True
        ),
        "layer_alignment.png": plot_layer_heatmap(ds),
        "example_histograms.png": plot_example_histograms(ds),
        "predicted_vs_measured.png": plot_predicted_vs_measured(ds),
        "accuracy_vs_alignment.png": plot_final_vs_alignment(
            ds, "cosine", xlabel="mean cos(g_t, g_d) over the run (before any intervention)"
        ),
        "accuracy_vs_update_alignment.png": plot_final_vs_alignment(
            ds, "update_cosine", xlabel="mean cos(g_t, applied update) (< 0: lowers trait loss)"
        ),
    }
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120)
        paths.append(out / name)
    return paths
