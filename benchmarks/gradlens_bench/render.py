"""The one renderer: ``table.md`` and ``probes.png`` from a ``results.nc``.

It reads only the file (labels, descriptions and baselines are coordinates),
so results of earlier runs render without the registry that made them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from gradlens_bench.models import ZOO
from gradlens_bench.overhead import overhead_markdown
from gradlens_bench.results import add_ratios
from gradlens_bench.summary import realistic_markdown

__all__ = ["markdown", "plot", "render", "targets_markdown"]

_SHORT = {
    "skipped": "skip",
    "unsupported": "unsup.",
    "missing": "n/a",
    "mismatch": "WRONG",
    "not run": "-",
    "not applicable": "-",
}
_ABSOLUTE = {
    "time_ratio": "time_median",
    "cpu_time_ratio": "cpu_time_median",
    "memory_ratio": "peak_memory",
}
_CPU_TIME_TITLE = "Process CPU time (the steadier number on a shared CPU; see the docs)"


def _at(ds: xr.Dataset, **labels: object) -> xr.Dataset:
    """``ds.sel`` by labels; a dict, because ``method`` is also a keyword of ``sel``."""
    return ds.sel(labels)


def _baseline(ds: xr.Dataset, method: str) -> str:
    return str(_at(ds, method=method)["baseline"].item()) if "baseline" in ds.coords else "plain"


def _methods(ds: xr.Dataset, model: str) -> list[str]:
    """The methods that apply to ``model`` (some case not ``"not applicable"``)."""
    status = _at(ds, model=model)["status"]
    return [
        str(m) for m in ds["method"].values if (status.sel({"method": m}) != "not applicable").any()
    ]


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.3g} MiB" if n < 2**30 else f"{n / 2**30:.3g} GiB"


def _cell(ds: xr.Dataset, var: str, model: str, batch: int, method: str) -> str:
    at = _at(ds, model=model, batch=batch, method=method)
    status = str(at["status"].item())
    if status != "ok":
        return _SHORT.get(status, status)
    base = _baseline(ds, method)
    if method == base:
        absolute = float(at[_ABSOLUTE[var]].item())
        if not math.isfinite(absolute):  # not measured: peak memory of the DDP methods
            return "-"
        return _fmt_bytes(absolute) if var == "memory_ratio" else _fmt_time(absolute)
    value = float(at[var].item())
    if not math.isfinite(value):
        return "-"
    if var != "time_ratio":
        return f"{value:.2f}x"
    ref = float(_at(ds, model=model, batch=batch, method=base)["time_median"].item())
    q25, q75 = (float(at[k].item()) / ref for k in ("time_q25", "time_q75"))
    return f"{value:.2f}x ({q25:.2f}-{q75:.2f})"


def _agreement(ds: xr.Dataset) -> list[str]:
    models = [str(m) for m in ds["model"].values]
    lines = [
        "### Agreement check (probes: per-example autograd loop; steps: same update)",
        "",
        "| method | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    notes = []
    for method in ds["method"].values:
        cells = []
        for model in models:
            at = _at(ds, model=model, method=method)
            status, err = str(at["agreement_status"].item()), float(at["agreement_error"].item())
            if status == "ok":
                cells.append(f"ok ({err:.0e})" if math.isfinite(err) else "n/a (no gradient)")
            else:
                cells.append(_SHORT.get(status, status))
            if str(at["agreement_note"].item()):
                notes.append(f"- {model} / {method}: {at['agreement_note'].item()}")
            for batch in ds["batch"].values:
                case = _at(ds, model=model, batch=batch, method=method)
                if str(case["status"].item()) in ("failed", "error"):
                    notes.append(f"- {model} / {method} / B={batch}: {case['note'].item()}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + (["", "Notes:", "", *notes] if notes else [])


def markdown(ds: xr.Dataset) -> str:
    """Per model: time and peak memory of every method as a ratio to its baseline.

    The baseline row gives absolute medians; the other rows give ratios in the
    same run, the wall-clock time with the inter-quartile range divided by the
    baseline's median. On CPU a third table gives process CPU time ratios.
    """
    a = ds.attrs
    lines = [
        f"Device: {a['device_name']} (`{a['device']}`); torch {a['torch_version']}, gradlens "
        f"{a['gradlens_version']}, opacus {a['opacus_version']}, backpack "
        f"{a['backpack_version']}; TF32 {a.get('tf32', 'not recorded')}; commit "
        f"`{a['git_commit'][:10]}`; {a['created_at']}.",
        "",
    ]
    if "ddp_world_size" in a:
        lines += [
            f"DDP models: {a['ddp_world_size']} processes (gloo), {a['ddp_threads']} thread(s) "
            f"each, B examples per rank; per method {a['ddp_blocks']} blocks of "
            f"{a['ddp_steps']} steps, interleaved; times per step, CPU time of rank 0.",
            "",
        ]
    batches = [int(b) for b in ds["batch"].values]
    head = [
        "| method | " + " | ".join(f"B={b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    tables = [("time_ratio", "Time (wall clock)"), ("memory_ratio", "Peak memory")]
    if a["device"] == "cpu":
        tables.insert(1, ("cpu_time_ratio", _CPU_TIME_TITLE))
    for model in ds["model"].values:
        at = _at(ds, model=model)
        methods = _methods(ds, model)
        bases = list(dict.fromkeys(_baseline(ds, m) for m in methods))
        base = " / ".join(str(_at(ds, method=b)["method_label"].item()) for b in bases)
        if len(bases) > 1:
            base = f"each method's baseline, {base}"
        lines += [
            f"### {model}: {at['model_description'].item()} ({int(at['n_params']):,} parameters)",
            "",
        ]
        for var, title in tables:
            if var == "memory_ratio" and not np.isfinite(at["peak_memory"].values).any():
                continue  # not measured for this model (the DDP methods share processes)
            its = "their rows" if len(bases) > 1 else "its row"
            lines += [f"{title}, ratio to {base} ({its}: absolute)", "", *head]
            for method in methods:
                label = _at(ds, method=method)["method_label"].item()
                cells = [_cell(ds, var, model, b, method) for b in batches]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines + _agreement(ds)) + "\n"


_TARGETS = (
    ("per_example_grads time <= 2x plain", "mlp", "pe_grads", "plain", 2.0),
    ("per_example_grads time <= opacus time", "mlp", "pe_grads", "opacus", 1.0),
    ("per_example_grads time <= backpack time", "mlp", "pe_grads", "backpack", 1.0),
    ("ghost per_example_dots time <= 1.5x plain", "mlp", "dots_ghost", "plain", 1.5),
    (
        "probed student step time <= 2x unprobed step",
        "mnist_step",
        "step_probed",
        "step_unprobed",
        2.0,
    ),
)


def _value(ds: xr.Dataset, var: str, model: str, method: str, batch: int = 1024) -> float:
    if model not in ds["model"].values or method not in ds["method"].values:
        return math.nan
    at = _at(ds, model=model, batch=batch, method=method)
    return float(at[var].item()) if at["status"].item() == "ok" else math.nan


def _verdict(value: float, limit: float, unit: str = "x") -> str:
    return (
        "-" if math.isnan(value) else f"{value:.2f}{unit} ({'met' if value <= limit else 'missed'})"
    )


def targets_markdown(ds: xr.Dataset) -> str:
    """The performance targets at B=1024 with the measured ratios; empty if not measured."""
    if 1024 not in ds["batch"].values:
        return ""
    lines = [
        "### Targets (B=1024)",
        "",
        "| target | wall clock | process CPU time |",
        "|---|---:|---:|",
    ]
    for name, model, method, rival, limit in _TARGETS:
        unit = "x" if rival in ("plain", "step_unprobed") else f"x {rival}"
        cells = [
            _verdict(_value(ds, c, model, method) / _value(ds, c, model, rival), limit, unit)
            for c in ("time_median", "cpu_time_median")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    memory = _value(ds, "peak_memory", "mlp", "dots_ghost") / _value(
        ds, "peak_memory", "mlp", "plain"
    )
    lines.append(
        f"| ghost per_example_dots peak memory <= 1.5x plain | {_verdict(memory, 1.5)} | - |"
    )
    return "\n".join(lines) + "\n"


ZOO_BATCH = 256
_ZOO_TARGETS = (
    ("per_example_dots auto time <= 1.5x plain", "dots_auto", "plain", "time", 1.5),
    ("per_example_dots auto peak memory <= 2x plain", "dots_auto", "plain", "memory", 2.0),
    ("probed step time <= 2.5x unprobed step", "step_probed", "step_unprobed", "time", 2.5),
    ("probed step peak memory <= 2x unprobed", "step_probed", "step_unprobed", "memory", 2.0),
)


def zoo_targets_markdown(ds: xr.Dataset) -> str:
    """Issue 9's targets on the zoo models at B=256 with the measured ratios; empty if none."""
    models = [m for m in ZOO if m in ds["model"].values]
    if ZOO_BATCH not in ds["batch"].values or not models:
        return ""
    lines = [
        f"### Targets on the zoo models (B={ZOO_BATCH})",
        "",
        "| model | target | wall clock or peak memory | process CPU time |",
        "|---|---|---:|---:|",
    ]
    for model in models:
        for name, method, rival, kind, limit in _ZOO_TARGETS:
            clocks = ("time_median", "cpu_time_median") if kind == "time" else ("peak_memory",)
            cells = [
                _verdict(
                    _value(ds, c, model, method, ZOO_BATCH)
                    / _value(ds, c, model, rival, ZOO_BATCH),
                    limit,
                )
                for c in clocks
            ]
            lines.append(f"| {model} | {name} | " + " | ".join([*cells, "-"][:2]) + " |")
    return "\n".join(lines) + "\n"


def plot(ds: xr.Dataset, path: Path) -> None:
    """Time and peak memory against batch size, one row per model, log-log axes."""
    models = list(ds["model"].values)
    fig = Figure(figsize=(11, 3.2 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for method in _methods(ds, model):
            at = _at(ds, model=model, method=method)
            ok = (at["status"] == "ok").values
            if not ok.any():
                continue
            base = method == _baseline(ds, method)
            style = {
                "marker": "o",
                "label": str(at["method_label"].item()),
                "lw": 2.5 if base else 1.5,
                "color": "black" if base else ("grey" if method == "write_floor" else None),
                "ls": "--" if method == "write_floor" else "-",
            }
            for ax, values in zip(
                row, (at["time_median"].values, at["peak_memory"].values / 2**20), strict=True
            ):
                shown = ok & np.isfinite(values)  # the DDP methods have no peak memory
                if shown.any():
                    ax.plot(at["batch"].values[shown], values[shown], **style)
        for ax, what, unit in (
            (row[0], "time", "median time (s)"),
            (row[1], "peak memory", "peak memory increase (MiB)"),
        ):
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="batch size",
                ylabel=unit,
                title=f"{model}: {what}",
            )
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="upper left")
            else:
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
    fig.suptitle(ds.attrs["device_name"])
    fig.savefig(path, dpi=110)


def render(results: Path) -> str:
    """Write ``table.md`` and ``probes.png`` next to a ``results.nc``; return the table.

    An ``overhead.json`` of the first DDP benchmark gives ``overhead.md`` instead
    (:func:`gradlens_bench.overhead.overhead_markdown`).
    """
    if results.suffix == ".json":
        table = overhead_markdown(json.loads(results.read_text()))
        (results.parent / "overhead.md").write_text(table)
        return table
    with xr.open_dataset(results) as stored:
        ds = add_ratios(stored.load())
    table = realistic_markdown(ds) + markdown(ds) + "\n" + targets_markdown(ds)
    table += zoo_targets_markdown(ds)
    (results.parent / "table.md").write_text(table)
    plot(ds, results.parent / "probes.png")
    return table
