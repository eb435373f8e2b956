"""The run's summary: the setting, each condition's trait transfer, paired differences."""

from __future__ import annotations

import numpy as np
import xarray as xr

from gradlens.stats import mean_ci, paired_t

__all__ = ["condition_values", "summary_markdown"]

REFERENCE = "same_init"
"""The condition every other one is compared with, paired over seeds."""


def _fmt(da: xr.DataArray, digits: int = 4) -> str:
    ci = mean_ci(da, dim="seed")
    return f"{float(ci['mean']):.{digits}f} ± {float(ci['half_width']):.{digits}f}"


def condition_values(ds: xr.Dataset) -> xr.Dataset:
    """Per condition and seed: the trait probability at the start and end, and step means.

    Returns:
        A Dataset over ``(condition, seed)`` with ``start``, ``final`` and
        ``change`` of ``trait_prob``; ``train_loss_first``/``_last`` (mean over
        the first and last tenth of steps); the step means of ``cosine``,
        ``update_cosine`` and ``teacher_cosine``; and the final ``drift_cosine``
        and ``drift_norm``.
    """
    steps = int(ds.step.max())
    tenth = max(1, steps // 10)
    prob = ds["trait_prob"]
    trained = ds.sel(step=slice(0, steps - 1))
    values = {
        "start": prob.sel(step=0),
        "final": prob.sel(step=steps),
        "change": prob.sel(step=steps) - prob.sel(step=0),
        "train_loss_first": trained["train_loss"].isel(step=slice(0, tenth)).mean("step"),
        "train_loss_last": trained["train_loss"].isel(step=slice(-tenth, None)).mean("step"),
        "cosine": trained["cosine"].mean("step"),
        "update_cosine": trained["update_cosine"].mean("step"),
        "teacher_cosine": trained["teacher_cosine"].mean("step"),
        "drift_cosine": trained["drift_cosine"].isel(step=-1),
        "drift_norm": trained["drift_norm"].isel(step=-1),
    }
    return xr.Dataset({k: v.drop_vars("step", errors="ignore") for k, v in values.items()})


def summary_markdown(ds: xr.Dataset) -> str:
    """The run's summary as Markdown: intervals are 95% Student-t over seeds."""
    n = ds.sizes["seed"]
    lines = [
        "# Subliminal learning in a small language model",
        "",
        f"Mean ± 95% Student-t half-width over {n} seeds (each its own base, other base, "
        "teacher and number data). Trait measure: p(trait answer | question), the mean over "
        "every question.",
        "",
        "## The setting",
        "",
        "| quantity | value |",
        "| --- | --- |",
    ]
    for name in (
        "base_trait_prob",
        "teacher_trait_prob",
        "other_trait_prob",
        "base_top_answer_prob",
        "teacher_kept",
        "base_kept",
    ):
        lines.append(f"| {ds[name].attrs['long_name']} | {_fmt(ds[name])} |")
    values = condition_values(ds)
    lines += [
        "",
        "## Students",
        "",
        "| condition | trait p, start | trait p, end | change | train loss, first → last "
        "tenth | mean cos(g_t, g) | mean cos(g_t, update) | mean cos(update, teacher - base) "
        "| final cos(student - init, teacher - base) | final ‖student - init‖ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in ds.condition.values:
        v = values.sel(condition=c)
        lines.append(
            f"| {c} | {_fmt(v['start'])} | {_fmt(v['final'])} | {_fmt(v['change'])} | "
            f"{_fmt(v['train_loss_first'], 3)} → {_fmt(v['train_loss_last'], 3)} | "
            f"{_fmt(v['cosine'])} | {_fmt(v['update_cosine'])} | {_fmt(v['teacher_cosine'])} "
            f"| {_fmt(v['drift_cosine'])} | {_fmt(v['drift_norm'], 3)} |"
        )
    if REFERENCE in ds.condition.values:
        lines += [
            "",
            f"## Paired differences of the change in trait p: {REFERENCE} - condition",
            "",
            "| condition | mean difference | 95% interval | p (paired t) |",
            "| --- | --- | --- | --- |",
        ]
        ref = values["change"].sel(condition=REFERENCE)
        for c in ds.condition.values:
            if c == REFERENCE:
                continue
            d = paired_t(ref, values["change"].sel(condition=c), dim="seed")
            lines.append(
                f"| {c} | {float(d['mean']):+.4f} | [{float(d['lower']):+.4f}, "
                f"{float(d['upper']):+.4f}] | {float(d['p']):.3g} |"
            )
    change = values["change"].values.ravel()
    drift = values["drift_cosine"].values.ravel()
    r = float(np.corrcoef(drift, change)[0, 1]) if change.size > 2 else float("nan")
    lines += [
        "",
        "## Does the student's displacement along the teacher's predict transfer?",
        "",
        f"Pearson r between the final cos(student - init, teacher - base) and the change in "
        f"trait p, over all {change.size} students (every condition and seed): {r:+.3f}.",
        "",
    ]
    return "\n".join(lines)
