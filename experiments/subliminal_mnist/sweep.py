"""One setting swept over several runs: final values side by side, a table and a figure.

A sweep is a set of combined (or compact) runs that differ in one setting,
the swept ``dim`` (the liminal ``lambda0``, the trait probe size, ...). Each
run gives :func:`subliminal_mnist.final_values` per condition and model;
:func:`sweep_finals` puts them along ``dim``. Models are paired across
conditions at one value of ``dim`` (same initialisation, teacher and noise),
never across values: a run at another value may hold other models.

The table (:func:`sweep_markdown`) and figure (:func:`plot_sweep`) read only
the stored finals, so both recompute from the committed ``sweep.nc``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from gradlens.stats import mean_ci, paired_t
from subliminal_mnist.report import final_values

__all__ = [
    "SWEEP_FILE",
    "match_markdown",
    "matched_value",
    "plot_sweep",
    "sweep_finals",
    "sweep_markdown",
]

SWEEP_FILE = "sweep.nc"

UNITS = {
    "test_accuracy": "1",
    "test_loss": "nat",
    "test_entropy": "nat",
    "test_majority": "1",
    "cosine": "1",
    "cosine_positive": "1",
    "update_cosine": "1",
    "distill_loss": "nat",
}


def sweep_finals(
    runs: Mapping[float, xr.Dataset],
    *,
    dim: str,
    conditions: Sequence[str],
    commands: Mapping[float, str],
    shared: xr.Dataset | None = None,
) -> xr.Dataset:
    """The final values of ``conditions`` in each run, along a new ``dim``.

    Args:
        runs: Swept value -> the run's combined or compact Dataset (dims
            ``step``, ``condition``, ``model``, ...). Every run must hold every
            condition of ``conditions``.
        dim: Name of the swept setting (a netCDF name: ``lambda0``, ``probe_size``).
        conditions: The conditions to keep, the compared one last and the
            baseline (usually ``aux``) first.
        commands: Swept value -> the command that made its run (provenance).
        shared: A run whose conditions stand in for those a swept run lacks:
            a condition the swept setting does not change (``aux`` does not
            depend on the liminal ``lambda0``), run once on the same models.

    Returns:
        :func:`~subliminal_mnist.final_values` with dims ``(dim, condition,
        model)``, NaN where a run lacks a model; attrs ``commands`` (one line
        per value) and ``conditions``.

    Raises:
        ValueError: If a run (with ``shared``) lacks one of ``conditions``, or
            ``runs`` is empty.
    """
    if not runs:
        raise ValueError("sweep_finals needs at least one run.")
    finals = []
    for value, ds in sorted(runs.items()):
        parts = []
        for condition in conditions:
            source = ds if condition in ds.condition.values else shared
            if source is None or condition not in source.condition.values:
                raise ValueError(
                    f"the run at {dim} = {value} lacks the condition {condition!r}; it holds "
                    f"{list(ds.condition.values)} (pass a shared run that holds it)."
                )
            # ``seed`` (a coord along ``model``) would turn to NaN where runs hold other models.
            parts.append(
                final_values(source.sel(condition=[condition])).drop_vars("seed", errors="ignore")
            )
        finals.append(xr.concat(parts, dim="condition", join="outer"))
    out = xr.concat(finals, dim=dim, join="outer").assign_coords({dim: sorted(runs)})
    for name, units in UNITS.items():
        if name in out:
            out[name].attrs["units"] = units
    out.attrs["commands"] = "\n".join(f"{dim}={v:g}: {commands[v]}" for v in sorted(runs))
    out.attrs["conditions"] = " ".join(conditions)
    return out


def _cell(values: xr.DataArray, percent: bool = False, digits: int = 4) -> str:
    ci = mean_ci(values, dim="model")
    scale, unit, places = (100.0, "%", 1) if percent else (1.0, "", digits)
    mean, half = float(ci["mean"]) * scale, float(ci["half_width"]) * scale
    half_text = "n/a" if np.isnan(half) else f"{half:.{places}f}"
    return f"{mean:.{places}f}{unit} ± {half_text}"


def sweep_markdown(finals: xr.Dataset, *, dim: str) -> str:
    """A table, one row per value of ``dim``: the compared condition, and it minus the baseline.

    The compared condition is the last of ``finals.attrs["conditions"]``, the
    baseline the first. With ``finals.attrs["match"]`` (a variable, ``mnist_sweep.py
    --match``) the table is followed by :func:`match_markdown`. ± is the half-width
    of a 95% Student-t interval over the run's models; differences are paired model
    by model within a row.
    """
    baseline, *_, compared = finals.attrs["conditions"].split()
    lines = [
        f"# `{compared}` over {dim}",
        "",
        *(
            [f"Made by `{finals.attrs['sweep_command']}` from these runs:", ""]
            if "sweep_command" in finals.attrs
            else []
        ),
        "Commands, one run per row:",
        "",
        *(f"- `{line}`" for line in finals.attrs["commands"].splitlines()),
        *([f"- {finals.attrs['shared']}"] if "shared" in finals.attrs else []),
        "",
        f"± is the half-width of a 95% Student-t interval over the models of the row; "
        f"`{compared}` minus `{baseline}` is paired model by model (same initialisation, "
        "teacher and noise), with the two-sided p of the paired t test.",
        "",
        f"| {dim} | models | `{compared}` test accuracy | minus `{baseline}` (points) | p | "
        f"`{compared}` majority-class fraction | `{compared}` mean cos(g_t, g_d) | "
        f"`{baseline}` mean cos(g_t, g_d) | `{compared}` final distillation loss (nat) | "
        f"`{baseline}` test accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for value in finals[dim].values:
        row = finals.sel({dim: value})
        this, base = row.sel(condition=compared), row.sel(condition=baseline)
        n = int(this["test_accuracy"].notnull().sum())
        diff = paired_t(
            this["test_accuracy"].dropna("model"),
            base["test_accuracy"].dropna("model"),
            dim="model",
        )
        diff_text = f"{100 * float(diff['mean']):.1f} ± {100 * float(diff['half_width']):.1f}"
        lines.append(
            f"| {value:g} | {n} | {_cell(this['test_accuracy'], percent=True)} | {diff_text} | "
            f"{float(diff['p']):.2g} | {_cell(this['test_majority'], digits=3)} | "
            f"{_cell(this['cosine'])} | {_cell(base['cosine'])} | "
            f"{_cell(this['distill_loss'], digits=5)} | "
            f"{_cell(base['test_accuracy'], percent=True)} |"
        )
    table = "\n".join(lines) + "\n"
    if "match" in finals.attrs:
        table += "\n" + match_markdown(finals, dim=dim, variable=finals.attrs["match"])
    return table


def matched_value(finals: xr.Dataset, *, dim: str, variable: str = "distill_loss") -> float:
    """The value of ``dim`` where the compared condition's ``variable`` is nearest the baseline's.

    Nearest on a log scale: the value minimising ``|log m_c - log m_b|``, where
    ``m_c`` and ``m_b`` are the compared and baseline conditions' means over
    models of the final ``variable`` at that value (``m_b`` is the same at every
    value when the baseline comes from one shared run). For choosing, say, the
    SGD learning rate whose final distillation loss matches Adam's ``aux``.

    Raises:
        ValueError: If no value has a finite positive mean for both conditions.
    """
    baseline, *_, compared = finals.attrs["conditions"].split()
    this = finals[variable].sel(condition=compared).mean("model")
    base = finals[variable].sel(condition=baseline).mean("model")
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.abs(np.log(this.values.astype(float)) - np.log(base.values.astype(float)))
    if not np.isfinite(gap).any():
        raise ValueError(
            f"no {dim} has a finite positive mean {variable} for both `{compared}` and "
            f"`{baseline}`; check the runs (a diverged run, or a variable the files lack)."
        )
    return float(finals[dim].values[int(np.nanargmin(np.where(np.isfinite(gap), gap, np.nan)))])


def match_markdown(finals: xr.Dataset, *, dim: str, variable: str = "distill_loss") -> str:
    """A section naming :func:`matched_value` with the means it was chosen from."""
    baseline, *_, compared = finals.attrs["conditions"].split()
    chosen = matched_value(finals, dim=dim, variable=variable)
    values = [float(v) for v in finals[dim].values]
    lines = [
        f"## The {dim} matched on the final `{variable}`",
        "",
        f"`{compared}`'s mean final `{variable}` over models is nearest `{baseline}`'s (on a log "
        f"scale) at **{dim} = {chosen:g}**.",
        "",
        f"| {dim} | `{compared}` final {variable} | `{baseline}` final {variable} | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for value in values:
        row = finals[variable].sel({dim: value})
        this = float(row.sel(condition=compared).mean("model"))
        base = float(row.sel(condition=baseline).mean("model"))
        lines.append(f"| {value:g} | {this:.3g} | {base:.3g} | {this / base:.3g} |")
    if chosen in (min(values), max(values)) and len(values) > 1:
        lines += [
            "",
            f"The match lies at the edge of the swept values: extend the sweep past {chosen:g} "
            "before using it.",
        ]
    return "\n".join(lines) + "\n"


def _clipped(ci: xr.Dataset, name: str = "test_accuracy") -> xr.Dataset:
    """An accuracy's interval clipped to [0, 1] (a t interval over few models can pass both)."""
    if name != "test_accuracy":
        return ci
    ci = ci.astype("float64")  # float32 files: mean - (mean - 0) must not round below 0
    return ci.assign(lower=ci["lower"].clip(0.0, 1.0), upper=ci["upper"].clip(0.0, 1.0))


def plot_sweep(finals: xr.Dataset, *, dim: str, xlabel: str, log: bool = False) -> Figure:
    """Three panels over the swept setting, means and 95% t intervals over models.

    ``log`` draws the swept setting on a log scale (symmetric-log, linear up
    to the smallest positive value, where it includes 0).

    Accuracy intervals are clipped to [0, 1].

    Left: test accuracy of the baseline and the compared condition. Middle:
    their run-mean cos(g_t, g_d). Right: the compared condition's test
    accuracy against its final distillation loss, each point a value of ``dim``.
    """
    baseline, *_, compared = finals.attrs["conditions"].split()
    x = np.asarray(finals[dim].values, dtype=float)
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    acc_ax, cos_ax, trade_ax = fig.subplots(1, 3)
    for condition, colour in ((baseline, "tab:blue"), (compared, "tab:red")):
        for ax, name, scale in ((acc_ax, "test_accuracy", 100.0), (cos_ax, "cosine", 1.0)):
            ci = _clipped(mean_ci(finals[name].sel(condition=condition), dim="model"), name)
            ax.errorbar(
                x,
                scale * ci["mean"].values,
                yerr=scale * np.stack([ci["mean"] - ci["lower"], ci["upper"] - ci["mean"]]),
                marker="o",
                capsize=3,
                color=colour,
                label=f"`{condition}`",
            )
    acc = _clipped(mean_ci(finals["test_accuracy"].sel(condition=compared), dim="model"))
    loss = mean_ci(finals["distill_loss"].sel(condition=compared), dim="model")
    # One colour per value, named in the legend: text labels overlap where points cluster.
    shades = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(x)))
    for k, value in enumerate(x):
        trade_ax.errorbar(
            loss["mean"].values[k],
            100 * acc["mean"].values[k],
            xerr=loss["half_width"].values[k],
            yerr=100
            * np.array(
                [
                    [acc["mean"].values[k] - acc["lower"].values[k]],
                    [acc["upper"].values[k] - acc["mean"].values[k]],
                ]
            ),
            marker="o",
            linestyle="none",
            capsize=3,
            color=shades[k],
            label=f"{value:g}",
        )
    trade_ax.legend(title=dim, fontsize="small")
    for ax in (acc_ax, cos_ax):
        ax.set_xlabel(xlabel)
        if log and (x > 0).all():
            ax.set_xscale("log")
        elif log:  # a zero on the axis: linear up to the smallest positive value
            ax.set_xscale("symlog", linthresh=float(x[x > 0].min()))
        ax.legend(title="condition")
        ax.grid(alpha=0.3)
    acc_ax.axhline(10, color="grey", linestyle=":", linewidth=1)
    acc_ax.set_ylabel("final test accuracy (%)")
    acc_ax.set_title("the trait: test accuracy (dotted: chance)")
    cos_ax.axhline(0, color="grey", linewidth=0.8)
    cos_ax.set_ylabel("run mean of cos(g_t, g_d) (1)")
    cos_ax.set_title("alignment of trait and training gradients")
    trade_ax.set_xlabel(f"`{compared}` final distillation loss (nat)")
    trade_ax.set_ylabel(f"`{compared}` final test accuracy (%)")
    trade_ax.set_title("trait against distillation")
    trade_ax.grid(alpha=0.3)
    n = int(finals["test_accuracy"].notnull().sum("model").min())
    fig.suptitle(f"{compared} over {dim}: means and 95% t intervals over models (n >= {n} a point)")
    return fig
