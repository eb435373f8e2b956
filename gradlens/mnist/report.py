"""The markdown summary of a combined MNIST auxiliary-logit run."""

from __future__ import annotations

import xarray as xr

from gradlens.stats import mean_ci

__all__ = ["summary_markdown"]


def _fmt(ci: xr.Dataset, percent: bool = False, digits: int = 4) -> str:
    scale, unit = (100.0, "%") if percent else (1.0, "")
    mean, half = float(ci["mean"]) * scale, float(ci["half_width"]) * scale
    places = 1 if percent else digits
    half_text = "n/a" if half != half else f"{half:.{places}f}"
    return f"{mean:.{places}f}{unit} ± {half_text}"


def summary_markdown(ds: xr.Dataset, *, wall_time_s: float, device: str, command: str) -> str:
    """Summarise final accuracies, alignment and its sign as mean ± 95% CI over seeds.

    Args:
        ds: The combined Dataset (with ``teacher_accuracy`` and ``reference_accuracy``).
        wall_time_s: Wall time of the whole run.
        device: Device description.
        command: The command that produced the run.

    Returns:
        Markdown text.
    """
    seeds = [int(s) for s in ds.seed.values]
    accuracy = ds["test_accuracy"].dropna("step", how="all").isel(step=-1)
    lines = [
        "# MNIST auxiliary-logit experiment: summary",
        "",
        f"Command: `{command}`  ",
        f"Seeds: {seeds} (n = {len(seeds)}); intervals are 95% Student-t CIs over seeds.  ",
        f"Device: {device}; wall time {wall_time_s / 60:.1f} min.",
        "",
        "| model | final test accuracy | mean cos(g_t, g_d) over steps | fraction of steps with "
        "cos > 0 | mean cos(g_t, update) | final distillation loss |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| teacher | {_fmt(mean_ci(ds['teacher_accuracy']), percent=True)} | | | | |",
        f"| reference (untrained) | {_fmt(mean_ci(ds['reference_accuracy']), percent=True)} "
        "| | | | |",
    ]
    for condition in ds.condition.values:
        sel = ds.sel(condition=condition)
        acc = _fmt(mean_ci(accuracy.sel(condition=condition)), percent=True)
        cos = _fmt(mean_ci(sel["cosine"].mean("step")))
        positive = _fmt(mean_ci((sel["cosine"] > 0).mean("step")), digits=3)
        update = _fmt(mean_ci(sel["update_cosine"].mean("step")))
        loss = _fmt(mean_ci(sel["distill_loss"].isel(step=-1)), digits=5)
        lines.append(f"| student `{condition}` | {acc} | {cos} | {positive} | {update} | {loss} |")
    return "\n".join(lines) + "\n"
