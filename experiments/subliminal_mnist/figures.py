"""The figures of a combined MNIST auxiliary-logit run, built on :mod:`gradlens.figures.plots`.

The run's Dataset is the one :func:`subliminal_mnist.combine_blocks` writes:
dims ``step``, ``model``, ``layer``, ``example_step``, ``example_model``,
``example``, ``condition``, with the variables of
:func:`subliminal_mnist.stack_variables`. Each figure draws one line or panel
per condition and averages over models (bands: 95% t intervals over models).
Files of the one-model-per-seed protocol (dim ``seed``) draw with
``replicate="seed"``.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

from gradlens.figures.plots import (
    check_layout,
    plot_histograms,
    plot_layer_heatmap,
    plot_over_steps,
    plot_scatter,
    plot_transform_cosine,
)
from gradlens.stats import mean_ci

__all__ = ["draw_figures", "plot_final_vs_alignment", "save_figures"]

STEP = "student step"
LAYER_LABELS = {"0": "0: 784 -> 256", "2": "2: 256 -> 256", "4": "4: 256 -> 13 (output)"}


def plot_final_vs_alignment(
    ds: xr.Dataset, var: str = "cosine", *, xlabel: str | None = None, replicate: str = "model"
) -> Figure:
    """Final student accuracy against the run's mean of ``var``, per condition (95% CIs).

    ``var="cosine"`` is the raw gradient alignment (measured before any
    intervention acts); ``var="update_cosine"`` is the alignment of the update
    actually applied, where interventions show.

    Raises:
        ValueError: ``var`` or ``test_accuracy`` is missing or lacks a
            ``step``, ``condition`` or ``seed`` dim.
    """
    who = "plot_final_vs_alignment"
    dims = ["step", "condition", replicate]
    values = check_layout(ds, var, dims, who=who)
    accuracy = check_layout(ds, "test_accuracy", dims, who=who)
    accuracy = accuracy.dropna("step", how="all").isel(step=-1)
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for condition in ds.condition.values:
        x = mean_ci(values.sel(condition=condition).mean("step"), dim=replicate)
        y = mean_ci(accuracy.sel(condition=condition), dim=replicate)
        ax.errorbar(
            float(x["mean"]),
            float(y["mean"]),
            xerr=float(x["half_width"]),
            yerr=float(y["half_width"]),
            fmt="o",
            capsize=3,
            label=str(condition),
        )
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_xlabel(xlabel or f"mean {values.attrs.get('long_name', var)} over the run")
    ax.set_ylabel("final student test accuracy")
    ax.legend(fontsize="small")
    ax.set_title(f"trait acquired against alignment (mean and 95% CI over {replicate}s)")
    return fig


def draw_figures(ds: xr.Dataset, replicate: str | None = None) -> dict[str, Figure]:
    """The standard figures of a run, keyed by their PNG file names.

    ``replicate``: the dim averaged over; default ``"model"`` when the run has
    one, else ``"seed"``.
    """
    if replicate is None:
        replicate = "model" if "model" in ds.dims else "seed"
    over_steps = {"hue": "condition", "xlabel": STEP, "replicate": replicate}
    figures = {
        "alignment.png": plot_over_steps(
            ds, "cosine", ylabel="cos(g_t, g_d)", zero_line=True, panels=True, **over_steps
        ),
        "accuracy.png": plot_over_steps(ds, "test_accuracy", ylabel="test accuracy", **over_steps),
        "distill_loss.png": plot_over_steps(
            ds, "distill_loss", ylabel="distillation loss (nat)", logy=True, **over_steps
        ),
        "update_alignment.png": plot_over_steps(
            ds,
            "update_cosine",
            ylabel="cos(g_t, applied update)",
            zero_line=True,
            panels=True,
            **over_steps,
        ),
        "layer_alignment.png": plot_layer_heatmap(
            ds,
            "layer_cosine",
            row="condition",
            xlabel=STEP,
            replicate=replicate,
            scale="row",
            layer_labels=LAYER_LABELS,
        ),
        "example_histograms.png": plot_histograms(
            ds,
            "example_cosine",
            column="example_step",
            row="condition",
            xlabel="cos(g_i, g_t)",
            title="per-example alignment of distillation examples with g_t (counts, pooled)",
        ),
        "predicted_vs_measured.png": plot_scatter(
            ds,
            "predicted_change",
            "measured_change",
            panel="condition",
            identity_line=True,
            xlabel="predicted change  g_t . delta (nat)",
            ylabel="measured change of the trait loss (nat)",
            title=f"trait-loss change per step, every {replicate} (one panel per condition)",
        ),
        "accuracy_vs_alignment.png": plot_final_vs_alignment(
            ds,
            "cosine",
            xlabel="mean cos(g_t, g_d) over the run (before any intervention)",
            replicate=replicate,
        ),
        "accuracy_vs_update_alignment.png": plot_final_vs_alignment(
            ds,
            "update_cosine",
            xlabel="mean cos(g_t, applied update) (< 0: lowers trait loss)",
            replicate=replicate,
        ),
    }
    if "transform_cosine" in ds and "all" in ds["group"].values:
        # conditions with a global transform (layer-scoped ones record per layer only)
        cos = ds["transform_cosine"].sel(group="all")
        recorded = cos.notnull().any([d for d in cos.dims if d != "condition"])
        conditions = [c for c, ok in zip(ds.condition.values, recorded.values, strict=True) if ok]
        if conditions:
            figures["transform_alignment.png"] = plot_transform_cosine(
                ds.sel(condition=conditions), replicate=replicate
            )
    if "applied_cosine" in ds:
        figures["applied_alignment.png"] = plot_over_steps(
            ds,
            "applied_cosine",
            ylabel="cos(g_t, gradient after the intervention)",
            zero_line=True,
            panels=True,
            **over_steps,
        )
    return figures


def save_figures(ds: xr.Dataset, out_dir: str | Path, replicate: str | None = None) -> list[Path]:
    """Draw the standard figures of a run and save them as PNG files in ``out_dir``.

    Returns:
        The paths written, in the order of :func:`draw_figures`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in draw_figures(ds, replicate).items():
        fig.savefig(out / name, dpi=120)
        paths.append(out / name)
    return paths
