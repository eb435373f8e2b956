"""The dose-response of the update's component along g_t, over ``aux`` and its scaled variants.

``scale_update_<alpha>`` keeps the fraction ``alpha`` of each Adam update's
component along ``g_t`` (:func:`gradlens.transforms.scale_aligned` as ``after=``);
``aux`` is ``alpha = 1`` and ``remove_update`` ``alpha = 0``. The conditions may
come from several runs of the same models (:func:`subliminal_mnist.pool.pool_runs`),
since each condition is a part of its own. :func:`dose_markdown` tabulates the final test
accuracy, the test loss, its change over the run (last evaluation minus first) and
the first-order drive against ``alpha``, paired with ``aux`` model by model;
:func:`plot_dose` draws them.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from gradlens.stats import mean_ci, paired_t

__all__ = ["dose_alpha", "dose_markdown", "dose_runs", "plot_dose"]


def dose_alpha(condition: str) -> float | None:
    """The fraction of the update's component along ``g_t`` that ``condition`` keeps, if any."""
    if condition == "aux":
        return 1.0
    if condition == "remove_update":
        return 0.0
    if condition.startswith("scale_update_"):
        return float(condition.removeprefix("scale_update_"))
    return None


def dose_runs(ds: xr.Dataset) -> xr.Dataset:
    """``ds``'s dose conditions, sorted by ``alpha`` (descending), with an ``alpha`` coord."""
    chosen = [str(c) for c in ds.condition.values if dose_alpha(str(c)) is not None]
    chosen.sort(key=lambda c: -float(dose_alpha(c)))  # type: ignore[arg-type]
    out = ds.sel(condition=chosen)
    return out.assign_coords(alpha=("condition", [dose_alpha(c) for c in chosen]))


def _at(ds: xr.Dataset, name: str, index: int) -> xr.DataArray:
    """``name`` at its first (``index=0``) or last (``-1``) evaluated step."""
    values = ds[name]
    for dim in ("eval_step", "step"):
        if dim in values.dims:
            values = values.dropna(dim, how="all").isel({dim: index})
    return values


def _measures(ds: xr.Dataset) -> dict[str, tuple[xr.DataArray, float, int]]:
    """Column name -> (values per model and condition, their factor, decimals shown)."""
    return {
        "test accuracy (%)": (_at(ds, "test_accuracy", -1), 100.0, 1),
        "test loss (nat)": (_at(ds, "test_loss", -1), 1.0, 2),
        "test loss change (nat)": (_at(ds, "test_loss", -1) - _at(ds, "test_loss", 0), 1.0, 3),
        "drive (nat)": (ds["predicted_change"].sum("step", skipna=False), 1.0, 3),
    }


def dose_markdown(ds: xr.Dataset) -> str:
    """A table over ``alpha``: each measure's mean ± 95% t interval and its paired change from aux.

    Args:
        ds: Pooled runs holding ``aux`` and dose conditions, dims ``condition``
            and ``model`` (``test_accuracy``, ``test_loss``, ``predicted_change``).
    """
    dose = dose_runs(ds)
    measures = _measures(dose)
    head = "| alpha | condition | models |"
    for name in measures:
        head += f" {name} | minus aux | p |"
    lines = [head, "|" + " --- |" * (3 + 3 * len(measures))]
    for condition in dose.condition.values:
        alpha = float(dose["alpha"].sel(condition=condition))
        n = int(measures["test accuracy (%)"][0].sel(condition=condition).notnull().sum())
        row = f"| {alpha:g} | `{condition}` | {n} |"
        for values, scale, digits in measures.values():
            this = values.sel(condition=condition) * scale
            ci = mean_ci(this, dim="model")
            row += f" {float(ci['mean']):.{digits}f} ± {float(ci['half_width']):.{digits}f} |"
            if condition == "aux":
                row += " | |"
                continue
            diff = paired_t(this, values.sel(condition="aux") * scale, dim="model")
            row += f" {float(diff['mean']):.{digits}f} ± {float(diff['half_width']):.{digits}f} |"
            row += f" {float(diff['p']):.2g} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def plot_dose(ds: xr.Dataset) -> Figure:
    """Final test accuracy, test loss and drive against ``alpha`` (mean and 95% CI over models)."""
    dose = dose_runs(ds)
    measures = _measures(dose)
    fig = Figure(figsize=(18, 4), layout="constrained")
    axes = fig.subplots(1, len(measures))
    alphas = dose["alpha"].values
    for ax, (name, (values, scale, _)) in zip(axes, measures.items(), strict=True):
        ci = mean_ci(values * scale, dim="model")
        mean, lower, upper = (ci[k].values for k in ("mean", "lower", "upper"))
        if name.startswith("test accuracy"):
            lower, upper = np.clip(lower, 0, 100), np.clip(upper, 0, 100)
        ax.errorbar(alphas, mean, yerr=[mean - lower, upper - mean], fmt="o-", capsize=3)
        ax.set_xlabel("alpha (fraction of the update's g_t component kept)")
        ax.set_ylabel(name)
        ax.axvline(0.0, color="k", lw=0.6)
    n = int(dose.sizes["model"])
    fig.suptitle(f"dose-response of the trait-aligned update (mean and 95% CI over {n} models)")
    return fig
