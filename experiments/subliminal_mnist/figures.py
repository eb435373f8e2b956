"""The figures of a combined MNIST auxiliary-logit run, built on :mod:`gradlens.figures.plots`.

The run's Dataset is the one :func:`subliminal_mnist.combine_blocks` writes:
dims ``step``, ``model``, ``layer``, ``example_step``, ``example_model``,
``example``, ``condition``, with the variables of
:func:`subliminal_mnist.stack_variables`. Each figure draws one line or panel
per condition and averages over models (bands: 95% t intervals over models).
Files of the one-model-per-seed protocol (dim ``seed``) draw with
``replicate="seed"``.

Conditions are told apart by colour: :data:`PALETTE` holds 20 distinct colours
(matplotlib's ten ``tab`` colours, then ten others, the most distinct first), so a run of
up to 20 conditions never repeats one. Accuracy intervals are clipped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import xarray as xr
from cycler import cycler
from matplotlib.colors import to_rgba
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

__all__ = ["PALETTE", "draw_figures", "plot_final_vs_alignment", "save_figures"]

PALETTE = (
    *(f"tab:{name}" for name in ("blue", "orange", "green", "red", "purple")),
    *(f"tab:{name}" for name in ("brown", "pink", "gray", "olive", "cyan")),
    "black",
    "lime",
    "magenta",
    "navy",
    "teal",
    "maroon",
    "gold",
    "darkviolet",
    "salmon",
    "darkgreen",
)


@contextmanager
def _palette() -> Iterator[None]:
    """Draw with :data:`PALETTE` as the colour cycle (``"C12"`` is its 13th colour)."""
    with mpl.rc_context({"axes.prop_cycle": cycler(color=list(PALETTE))}):
        yield


def _on_steps(ds: xr.Dataset) -> xr.Dataset:
    """A compact file's ``eval_step`` variables put back on ``step`` (NaN where not evaluated)."""
    if "eval_step" not in ds.dims or "step" not in ds.dims:
        return ds
    moved = {
        name: var.rename(eval_step="step").reindex(step=ds["step"])
        for name, var in ds.data_vars.items()
        if "eval_step" in var.dims
    }
    return ds.drop_vars(list(moved)).drop_dims("eval_step").assign(moved)


def _fix_colours(fig: Figure) -> None:
    """Resolve every line's ``"CN"`` colour now, so the figure keeps it outside the palette."""
    for ax in fig.axes:
        legend = ax.get_legend()
        handles = [] if legend is None else legend.legend_handles
        for line in [*ax.get_lines(), *handles]:
            if hasattr(line, "get_color"):
                line.set_color(to_rgba(line.get_color()))


STEP = "student step"
LAYER_LABELS = {"0": "0: 784 -> 256", "2": "2: 256 -> 256", "4": "4: 256 -> 13 (output)"}


def plot_final_vs_alignment(
    ds: xr.Dataset, var: str = "cosine", *, xlabel: str | None = None, replicate: str = "model"
) -> Figure:
    """Final student accuracy against the run's mean of ``var``, per condition (95% CIs).

    ``var="cosine"`` is the raw gradient alignment (measured before any
    intervention acts); ``var="applied_cosine"`` the alignment of the gradient
    handed to the optimizer, after the intervention; ``var="update_cosine"``
    is the alignment of the update actually applied. The accuracy interval is
    clipped to [0, 1].

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
        mean_y = float(y["mean"])
        low, high = max(float(y["lower"]), 0.0), min(float(y["upper"]), 1.0)  # an accuracy
        ax.errorbar(
            float(x["mean"]),
            mean_y,
            xerr=float(x["half_width"]),
            yerr=[[mean_y - low], [high - mean_y]],
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
    one, else ``"seed"``. ``accuracy_vs_alignment.png`` uses the alignment after
    the intervention (``applied_cosine``) where the run records it;
    ``example_histograms.png`` is drawn only from a file with per-example values
    (not from a compact file, whose ``eval_step`` variables are drawn on ``step``).
    """
    if replicate is None:
        replicate = "model" if "model" in ds.dims else "seed"
    ds = _on_steps(ds)
    with _palette():
        figures = _draw(ds, replicate)
        for fig in figures.values():
            _fix_colours(fig)
    return figures


def _draw(ds: xr.Dataset, replicate: str) -> dict[str, Figure]:
    # the gradient after the intervention where the run records it, else the raw one
    applied = "applied_cosine" if "applied_cosine" in ds else "cosine"
    applied_label = {
        "applied_cosine": "mean cos(g_t, gradient after the intervention) over the run",
        "cosine": "mean cos(g_t, g_d) over the run (no intervention recorded)",
    }[applied]
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
            ds, applied, xlabel=applied_label, replicate=replicate
        ),
        "accuracy_vs_update_alignment.png": plot_final_vs_alignment(
            ds,
            "update_cosine",
            xlabel="mean cos(g_t, applied update) (< 0: lowers trait loss)",
            replicate=replicate,
        ),
    }
    if "example_cosine" in ds:  # the full file; compact files keep no per-example values
        figures["example_histograms.png"] = plot_histograms(
            ds,
            "example_cosine",
            column="example_step",
            row="condition",
            xlabel="cos(g_i, g_t)",
            title="per-example alignment of distillation examples with g_t (counts, pooled)",
        )
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
