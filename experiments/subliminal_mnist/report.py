"""The markdown summary of a combined MNIST auxiliary-logit run.

Statistics are over the ``replicate`` dim: ``model`` for runs of stacked models
(:func:`subliminal_mnist.combine_blocks`; models of every seed pooled, as each has
its own initialisation, teacher and noise), ``seed`` for files of the
one-model-per-seed protocol. Intervals are 95% Student-t intervals over that
dim, and the paired differences are taken model by model (a paired t interval:
the t interval of the per-model differences).
"""

from __future__ import annotations

import xarray as xr

from gradlens.stats import mean_ci, paired_t

__all__ = ["final_values", "headline_table", "summary_markdown"]

FINAL = ("test_accuracy", "test_loss", "test_entropy", "test_majority")


def _fmt(ci: xr.Dataset, percent: bool = False, digits: int = 4) -> str:
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean, half = float(ci["mean"]) * scale, float(ci["half_width"]) * scale
    places = 1 if percent else digits
    half_text = "n/a" if half != half else f"{half:.{places}f}"
    return f"{mean:.{places}f}{unit} ± {half_text}"


def _replicate(ds: xr.Dataset) -> str:
    return "model" if "model" in ds.dims else "seed"


def final_values(ds: xr.Dataset) -> xr.Dataset:
    """Per replicate and condition: the final evaluation and the run means of the probes.

    Returns:
        Variables ``test_accuracy``, ``test_loss``, ``test_entropy``,
        ``test_majority`` (last evaluated step), ``cosine``, ``update_cosine``
        (mean over steps), ``cosine_positive`` (fraction of steps with
        ``cosine > 0``) and ``distill_loss`` (last step), where the run has them.
    """
    out = {}
    for name in FINAL:
        if name in ds:
            step = "eval_step" if "eval_step" in ds[name].dims else "step"
            out[name] = ds[name].dropna(step, how="all").isel({step: -1}, drop=True)
    out["cosine"] = ds["cosine"].mean("step")
    out["cosine_positive"] = (
        (ds["cosine"] > 0).mean("step").where(ds["cosine"].notnull().any("step"))
    )
    out["update_cosine"] = ds["update_cosine"].mean("step")
    out["distill_loss"] = ds["distill_loss"].isel(step=-1, drop=True)
    return xr.Dataset(out)


def headline_table(ds: xr.Dataset) -> xr.Dataset:
    """Mean and 95% t interval over replicates of :func:`final_values`, per condition."""
    replicate = _replicate(ds)
    finals = final_values(ds)
    return xr.Dataset(
        {
            f"{name}_{stat}": ci[stat]
            for name in finals
            for ci in [mean_ci(finals[name], dim=replicate)]
            for stat in ("mean", "half_width", "n")
        }
    )


def summary_markdown(ds: xr.Dataset, *, wall_time_s: float, device: str, command: str) -> str:
    """Summarise final metrics, alignment and paired differences as mean ± 95% CI.

    Args:
        ds: The combined Dataset (with ``teacher_accuracy`` and ``reference_accuracy``).
        wall_time_s: Wall time of the whole run.
        device: Device description.
        command: The command that produced the run.

    Returns:
        Markdown text.
    """
    replicate = _replicate(ds)
    finals = final_values(ds)
    n = int(finals["cosine"].notnull().sum(replicate).max())
    lines = [
        "# MNIST auxiliary-logit experiment: summary",
        "",
        f"Command: `{command}`  ",
        f"Replicates: {n} {replicate}s per condition; ± is the half-width of a 95% Student-t "
        f"interval over {replicate}s.  ",
        f"Device: {device}; wall time {wall_time_s / 60:.1f} min.",
        "",
        "| model | test accuracy | test loss (nat) | prediction entropy (nat) | majority-class "
        "fraction | mean cos(g_t, g_d) | steps with cos > 0 | mean cos(g_t, update) | final "
        "distillation loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| teacher | {_fmt(mean_ci(ds['teacher_accuracy'], dim=replicate), percent=True)} "
        "| | | | | | | |",
        f"| reference (untrained) | "
        f"{_fmt(mean_ci(ds['reference_accuracy'], dim=replicate), percent=True)} | | | | | | | |",
    ]
    for condition in ds.condition.values:
        f = finals.sel(condition=condition)

        def cell(name: str, percent: bool = False, digits: int = 4, f: xr.Dataset = f) -> str:
            return _fmt(mean_ci(f[name], dim=replicate), percent=percent, digits=digits)

        lines.append(
            f"| student `{condition}` | {cell('test_accuracy', percent=True)} | "
            f"{cell('test_loss', digits=2)} | {cell('test_entropy', digits=3)} | "
            f"{cell('test_majority', digits=3)} | {cell('cosine')} | "
            f"{cell('cosine_positive', digits=3)} | {cell('update_cosine')} | "
            f"{cell('distill_loss', digits=5)} |"
        )
    if "aux" in ds.condition.values and len(ds.condition) > 1:
        lines += [
            "",
            f"Paired differences from `aux`, {replicate} by {replicate} (same initialisation, "
            f"teacher and noise): mean ± 95% paired t interval over {replicate}s and the "
            "two-sided p of the paired t test (`gradlens.stats.paired_t`).",
            "",
            "| condition | test accuracy minus aux (points) | p | test loss minus aux (nat) | p |",
            "| --- | --- | --- | --- | --- |",
        ]
        base = finals.sel(condition="aux")
        for condition in ds.condition.values:
            if condition == "aux":
                continue
            this = finals.sel(condition=condition)
            acc = paired_t(this["test_accuracy"], base["test_accuracy"], dim=replicate)
            loss = paired_t(this["test_loss"], base["test_loss"], dim=replicate)
            lines.append(
                f"| `{condition}` | {_fmt(acc, percent=True).replace('%', '')} | "
                f"{float(acc['p']):.2g} | {_fmt(loss, digits=2)} | {float(loss['p']):.2g} |"
            )
    return "\n".join(lines) + "\n"
