"""The run's summary: the setting, each condition's trait transfer, paired differences."""

from __future__ import annotations

import numpy as np
import xarray as xr

from gradlens.stats import mean_ci, paired_t

__all__ = ["condition_values", "summary_markdown", "token_dot_mean"]

REFERENCE = "same_init"
"""The condition every other one is compared with, paired over seeds."""

CONTROLS: dict[str, str] = {"same_init": "base_numbers", "lora": "lora_base_numbers"}
"""Each teacher-numbers condition's control: the same student on the base model's numbers."""


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
        "drive": trained["predicted_change"].sum("step"),
        "measured": trained["measured_change"].sum("step"),
    }
    return xr.Dataset({k: v.drop_vars("step", errors="ignore") for k, v in values.items()})


def _control_lines(ds: xr.Dataset, values: xr.Dataset) -> list[str]:
    """Paired differences of each teacher-numbers condition with its :data:`CONTROLS`."""
    names = list(ds.condition.values)
    pairs = [(c, control) for c, control in CONTROLS.items() if c in names and control in names]
    if not pairs:
        return []
    lines = [
        "",
        "## Paired differences with the control: teacher's numbers - base's numbers",
        "",
        "| condition - control | change in trait p: mean difference | 95% interval "
        "| p (paired t) | Σ predicted change: mean difference | 95% interval | p (paired t) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c, control in pairs:
        cells = []
        for name in ("change", "drive"):
            pair = (values[name].sel(condition=c), values[name].sel(condition=control))
            d = paired_t(*pair, dim="seed")
            cells.append(
                f"{float(d['mean']):+.4f} | [{float(d['lower']):+.4f}, "
                f"{float(d['upper']):+.4f}] | {float(d['p']):.3g}"
            )
        lines.append(f"| {c} - {control} | {cells[0]} | {cells[1]} |")
    return lines


def token_dot_mean(ds: xr.Dataset) -> xr.DataArray | None:
    """``token_dot`` by token position: the mean over steps and sequences; ``None`` if unrecorded.

    From a combined file's ``token_dot`` or a compact file's ``token_dot_mean``.

    Returns:
        ``(condition, seed, token)``, or ``None`` for a run without ``token_dot``.
    """
    if "token_dot_mean" in ds:
        return ds["token_dot_mean"]
    if "token_dot" not in ds:
        return None
    out = ds["token_dot"].mean(["step", "example"])
    out.attrs = {
        "long_name": "<grad l_it, g_t> by token position, mean over steps and sequences",
        "units": "nat^2",
    }
    return out


def _token_lines(ds: xr.Dataset) -> list[str]:
    """:func:`token_dot_mean` by token position, where the run recorded ``token_dot``."""
    dots = token_dot_mean(ds)
    if dots is None:
        return []
    # a prompt position carries no loss term: its value is 0 in every student
    positions = [int(t) for t in dots.token.values if bool((dots.sel(token=t) != 0).any())]
    lines = [
        "",
        "## Per-token alignment: <grad l_it, g_t> by token position",
        "",
        "Each sampled token's term of its sequence's loss (l_it / n_i, `token_losses`) "
        "against the trait gradient (`token_dot`; a row sums to the sequence's dot), the "
        "mean over steps and sequences, then over seeds (positions count from `<bos>` = 0; "
        "the prompt's positions carry no loss and are left out). Positive: a descent step "
        "on that token's loss lowers the trait loss to first order, teaching the trait.",
        "",
        "| condition | " + " | ".join(f"position {t}" for t in positions) + " |",
        "| --- |" + " --- |" * len(positions),
    ]
    for c in ds.condition.values:
        cells = []
        for t in positions:
            ci = mean_ci(dots.sel(condition=c, token=t), dim="seed")
            cells.append(f"{float(ci['mean']):+.2e} ± {float(ci['half_width']):.1e}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


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
    drive = [
        "",
        "## Cumulative first-order drive on the trait loss",
        "",
        "The sum over steps of g_t · update (`predicted_change`: each step's change of the "
        "trait loss on the probe questions to first order; negative: the steps teach the "
        "trait), beside the sum of the changes measured (nat).",
        "",
        "| condition | Σ predicted change | Σ measured change |",
        "| --- | --- | --- |",
    ]
    for c in ds.condition.values:
        v = values.sel(condition=c)
        lines.append(
            f"| {c} | {_fmt(v['start'])} | {_fmt(v['final'])} | {_fmt(v['change'])} | "
            f"{_fmt(v['train_loss_first'], 3)} → {_fmt(v['train_loss_last'], 3)} | "
            f"{_fmt(v['cosine'])} | {_fmt(v['update_cosine'])} | {_fmt(v['teacher_cosine'])} "
            f"| {_fmt(v['drift_cosine'])} | {_fmt(v['drift_norm'], 3)} |"
        )
        drive.append(f"| {c} | {_fmt(v['drive'])} | {_fmt(v['measured'])} |")
    lines += drive
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
    lines += _control_lines(ds, values) + _token_lines(ds)
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
