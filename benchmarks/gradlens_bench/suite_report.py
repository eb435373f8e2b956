"""``suite.md`` and ``suite.png`` of a GPU suite run (:mod:`gradlens_bench.suite`).

Reads only what the parts wrote: each harness part's ``results.nc`` and each
part's record (command, budget, wall time, outcome).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

from gradlens_bench.models import REALISTIC
from gradlens_bench.results import add_ratios
from gradlens_bench.summary import REUSED, K, every_k, realistic_markdown

__all__ = ["report"]

MNIST_TARGET_S = 60.0
"""Issue 21's target: 100 models x every MNIST condition, probed every step, on one H100."""


def _load(path: Path) -> xr.Dataset | None:
    if not path.is_file():
        return None
    with xr.open_dataset(path) as stored:
        return add_ratios(stored.load())


def _parts_table(records: Sequence[Mapping[str, object]]) -> list[str]:
    lines = ["| part | outcome | wall time | budget | note |", "|---|---|---:|---:|---|"]
    for r in records:
        wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
        budget = f"{r['budget_s']:.0f} s" if "budget_s" in r else "-"
        note = str(r.get("note", ""))
        lines.append(f"| {r['part']} | {r['status']} | {wall} | {budget} | {note} |")
    return lines


def _ratio(ds: xr.Dataset, model: str, batch: int, method: str) -> float:
    if method not in ds["method"].values:
        return math.nan
    at = ds.sel({"model": model, "batch": batch, "method": method})
    return float(at["time_ratio"].item()) if at["status"].item() == "ok" else math.nan


def _zoo_table(ds: xr.Dataset) -> list[str]:
    methods = [str(m) for m in ds["method"].values if m not in ("plain", "step_unprobed")]
    labels = [str(ds.sel({"method": m})["method_label"].item()) for m in methods]
    lines = [
        "Wall-clock time as a ratio to the baseline of the same run "
        "(probe methods: plain backward; steps: unprobed step):",
        "",
        "| model | B | " + " | ".join(labels) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for model in ds["model"].values:
        for batch in ds["batch"].values:
            cells = [_ratio(ds, str(model), int(batch), m) for m in methods]
            shown = ["-" if math.isnan(v) else f"{v:.2f}x" for v in cells]
            lines.append(f"| {model} | {batch} | " + " | ".join(shown) + " |")
    return lines


def _mnist(record: Mapping[str, object] | None, parts: Path) -> list[str]:
    """The MNIST part's line: its wall time, and how many (seed, condition) parts it finished."""
    if record is None:
        return []
    done = len(list(parts.glob("*.nc"))) if parts.is_dir() else 0
    wall = record.get("wall_s")
    verdict = ""
    if record["status"] == "ok" and isinstance(wall, float | int):
        met = "met" if wall <= MNIST_TARGET_S else "missed"
        verdict = f" (target under {MNIST_TARGET_S:.0f} s: {met})"
    return [
        "### MNIST: many models, every condition, probed every step",
        "",
        f"`{record.get('command', '')}`: {record['status']}, "
        f"{wall if wall is not None else '-'} s wall clock{verdict}, {done} (seed, condition) "
        "parts finished. The time is the whole "
        "command: data loading, the teachers, every condition's students, evaluation and "
        "writing.",
        "",
    ]


def _figure(found: Mapping[str, xr.Dataset], path: Path, title: str) -> None:
    """Bars: each realistic and tiny model's step ratios (probed, + trait, trait every K)."""
    rows: list[tuple[str, float, float, float]] = []
    for ds in found.values():
        for model in ds["model"].values:
            for batch in ds["batch"].values:
                base = _ratio(ds, str(model), int(batch), "step_probed")
                trait = _ratio(ds, str(model), int(batch), "step_plain_trait")
                if math.isnan(base):
                    continue
                reused = _ratio(ds, str(model), int(batch), REUSED)
                modelled = every_k(base, reused, 1.0, trait)
                long = ds.attrs.get("realistic_size") == "gpu_long"
                tag = f"{model} B={batch}" + (" (4096 tokens)" if long else "")
                rows.append((tag, trait, base, modelled))
    fig = Figure(figsize=(10, 0.45 * max(len(rows), 2) + 1.5), layout="constrained")
    ax = fig.subplots()
    ys = range(len(rows))
    h = 0.27
    for k, (label, color) in enumerate(
        (
            ("unprobed + trait gradient", "tab:grey"),
            ("probed step", "tab:blue"),
            (f"probed, trait every {K} (measured steps, or modelled)", "tab:cyan"),
        )
    ):
        ax.barh(
            [y + (k - 1) * h for y in ys], [r[k + 1] for r in rows], h, label=label, color=color
        )
    ax.axvline(1.0, color="black", lw=1)
    ax.axvline(1.3, color="tab:red", ls="--", lw=1, label="target 1.3x")
    ax.set(yticks=list(ys), yticklabels=[r[0] for r in rows], xlabel="time / unprobed step")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    fig.savefig(path, dpi=110)


def report(out: Path, records: Sequence[Mapping[str, object]]) -> str:
    """Write ``suite.md`` and ``suite.png`` under ``out`` from the parts' files; return the text."""
    found = {
        str(r["part"]): ds
        for r in records
        if (ds := _load(out / str(r["part"]) / "results.nc")) is not None
    }
    device = next((str(ds.attrs.get("device_name", "")) for ds in found.values()), "")
    lines = [f"## GPU suite: {device or out.name}", "", *_parts_table(records), ""]
    for part, ds in found.items():
        if set(ds["model"].values) & set(REALISTIC):
            lines += [f"Part `{part}`:", "", realistic_markdown(ds)]
        else:
            lines += [f"### Tiny models (part `{part}`)", "", *_zoo_table(ds), ""]
    mnist = next((r for r in records if r["part"] == "mnist"), None)
    lines += _mnist(mnist, out / "mnist" / "run" / "parts")
    text = "\n".join(lines) + "\n"
    (out / "suite.md").write_text(text)
    if found:
        _figure(found, out / "suite.png", f"Probed step cost, {device}")
    return text
