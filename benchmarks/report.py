"""Results of a probe benchmark run: labelled dataset, markdown table and plot.

The dataset has dims ``model``, ``batch`` and ``method`` for the measurements
and ``model``, ``method`` for the agreement checks; provenance (device,
library versions, git commit, configuration) is stamped in its attrs.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from matplotlib.figure import Figure

from benchmarks.cases import METHODS
from benchmarks.models import MODELS
from gradlens.provenance import make_attrs

__all__ = [
    "add_ratios",
    "build_dataset",
    "device_name",
    "device_slug",
    "markdown",
    "plot",
    "provenance",
]

ROOT = Path(__file__).resolve().parent.parent

_VARIABLES = {
    "time_median": ("median time of one call", "s", np.nan),
    "time_q25": ("25th percentile of the time of one call", "s", np.nan),
    "time_q75": ("75th percentile of the time of one call", "s", np.nan),
    "cpu_time_median": ("median process CPU time of one call, all threads (CPU only)", "s", np.nan),
    "repeats": ("number of timed calls", "1", 0),
    "peak_memory": ("peak bytes allocated by torch over the state before the call", "B", np.nan),
    "peak_rss": ("peak resident-set increase over the state after setup (CPU)", "B", np.nan),
    "load_average": ("1-minute load average of the machine when the case started", "1", np.nan),
}


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    """A folder name for the device, for example ``cpu-intel-xeon-processor-2t``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = device_name(device).rsplit(",", 1)[0]
        cpu = re.sub(r"\((R|TM)\)|\bCPU\b|@.*", " ", cpu)
        name = f"cpu {cpu} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def provenance(device: torch.device, config: object) -> dict[str, str | int]:
    """Attrs for the dataset: gradlens's provenance plus the device and the baselines' versions.

    Built on :func:`gradlens.provenance.make_attrs` (versions, time, commit and
    the config as JSON). netCDF attrs must be strings or numbers, so the
    working-tree state is the list of changed paths (``""`` when clean).
    """
    return {
        **make_attrs(config),
        "device": str(device),
        "device_name": device_name(device),
        "torch_num_threads": torch.get_num_threads(),
        "opacus_version": _version("opacus"),
        "backpack_version": _version("backpack-for-pytorch"),
        "platform": platform.platform(),
        "git_changed_paths": _git("status", "--porcelain", "--", "gradlens", "benchmarks"),
    }


def build_dataset(
    records: Sequence[Mapping[str, object]],
    agreements: Mapping[str, Mapping[str, object]],
    *,
    models: Sequence[str],
    batches: Sequence[int],
    methods: Sequence[str],
    attrs: Mapping[str, str | int],
) -> xr.Dataset:
    """Arrange case records and agreement checks into a labelled dataset.

    Args:
        records: One mapping per case with ``model``, ``batch``, ``method``,
            ``status``, ``note`` and, when measured, the timing and memory fields.
        agreements: ``"model/method"`` -> mapping with ``status``, ``error``, ``note``.
        models: Model names, in order.
        batches: Batch sizes, in order.
        methods: Method names, in order; ``"plain"`` must be among them.
        attrs: Provenance attrs.

    Returns:
        The dataset, with ``time_ratio`` and ``memory_ratio`` to the plain
        backward of the same model and batch.
    """
    shape = (len(models), len(batches), len(methods))
    data = {k: np.full(shape, fill, dtype=float) for k, (_, _, fill) in _VARIABLES.items()}
    status = np.full(shape, "not run", dtype=object)
    note = np.full(shape, "", dtype=object)
    for r in records:
        at = (models.index(r["model"]), batches.index(r["batch"]), methods.index(r["method"]))
        status[at], note[at] = r["status"], r.get("note", "")
        for key in data:
            if key in r:
                data[key][at] = r[key]
    coords = {
        "model": list(models),
        "batch": list(batches),
        "method": list(methods),
        "method_label": ("method", [METHODS[m].label for m in methods]),
        "model_description": ("model", [MODELS[m].description for m in models]),
    }
    dims = ("model", "batch", "method")
    ds = xr.Dataset(coords=coords, attrs=dict(attrs))
    for key, (long_name, units, _) in _VARIABLES.items():
        ds[key] = (dims, data[key], {"long_name": long_name, "units": units})
    ds["repeats"] = ds["repeats"].astype(np.int64)
    ds["status"] = (dims, status, {"long_name": "outcome of the case", "units": "1"})
    ds["note"] = (dims, note, {"long_name": "why a case was not measured", "units": "1"})
    ds = add_ratios(ds)
    pair = ("model", "method")
    check = {
        k: np.full((len(models), len(methods)), v, dtype=object)
        for k, v in (("status", "not run"), ("note", ""))
    }
    error = np.full((len(models), len(methods)), np.nan)
    for key, a in agreements.items():
        model, method = key.split("/")
        at = (models.index(model), methods.index(method))
        check["status"][at], check["note"][at], error[at] = a["status"], a["note"], a["error"]
    ds["agreement_status"] = (
        pair,
        check["status"],
        {"long_name": "agreement with the per-example autograd loop", "units": "1"},
    )
    ds["agreement_note"] = (pair, check["note"], {"long_name": "agreement detail", "units": "1"})
    ds["agreement_error"] = (
        pair,
        error,
        {"long_name": "max relative error against the per-example autograd loop", "units": "1"},
    )
    ds["n_params"] = (
        "model",
        [_n_params(m) for m in models],
        {"long_name": "trainable parameters", "units": "1"},
    )
    return ds


_RATIOS = {
    "time_ratio": ("time_median", "median time / plain backward"),
    "cpu_time_ratio": ("cpu_time_median", "median process CPU time / plain backward"),
    "memory_ratio": ("peak_memory", "peak memory / plain backward"),
}


def add_ratios(ds: xr.Dataset) -> xr.Dataset:
    """Add (or refresh) every ratio to the plain backward of the same model and batch."""
    plain = _at(ds, method="plain").drop_vars(["method", "method_label"])
    ratios = {
        name: (ds[var] / plain[var]).assign_attrs(long_name=long_name, units="1")
        for name, (var, long_name) in _RATIOS.items()
        if var in ds
    }
    return ds.assign(ratios)


def _n_params(model: str) -> int:
    return sum(p.numel() for p in MODELS[model].build().parameters())


def _at(ds: xr.Dataset, **labels: object) -> xr.Dataset:
    """``ds.sel`` by labels; a dict, because ``method`` is also a keyword of ``sel``."""
    return ds.sel(labels)


def _coord(ds: xr.Dataset, name: str, dim: str, key: str) -> str:
    """The value of the non-index coordinate ``name`` at ``dim=key``."""
    return str(ds[name].values[ds.indexes[dim].get_loc(key)])


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.3g} MiB" if n < 2**30 else f"{n / 2**30:.3g} GiB"


_SHORT = {
    "ok": "",
    "skipped": "skip",
    "unsupported": "unsup.",
    "missing": "n/a",
    "mismatch": "WRONG",
    "error": "error",
    "failed": "failed",
    "not run": "-",
}


def _cell(ds: xr.Dataset, var: str, model: str, batch: int, method: str) -> str:
    at = _at(ds, model=model, batch=batch, method=method)
    status = str(at["status"].item())
    if status != "ok":
        return _SHORT.get(status, status)
    if method == "plain":
        absolute = float(at[_RATIOS[var][0]].item())
        return _fmt_bytes(absolute) if var == "memory_ratio" else _fmt_time(absolute)
    value = float(at[var].item())
    if not math.isfinite(value):
        return "-"
    if var == "time_ratio":
        q25, q75 = (
            float(at[k].item())
            / float(_at(ds, model=model, batch=batch, method="plain")["time_median"].item())
            for k in ("time_q25", "time_q75")
        )
        return f"{value:.2f}x ({q25:.2f}-{q75:.2f})"
    return f"{value:.2f}x"


_CPU_TIME_TITLE = "Process CPU time (the steadier number on a shared CPU; see the docs)"


def markdown(ds: xr.Dataset) -> str:
    """Per model: time and peak memory of every method as a ratio to the plain backward.

    The plain row gives the absolute median time and peak memory of the plain
    backward; the other rows give ratios in the same run, the wall-clock time
    with the inter-quartile range of the method divided by the plain median.
    On CPU a third table gives the ratio of median process CPU times.
    """
    lines = [
        f"Device: {ds.attrs['device_name']} (`{ds.attrs['device']}`); torch "
        f"{ds.attrs['torch_version']}, gradlens {ds.attrs['gradlens_version']}, opacus "
        f"{ds.attrs['opacus_version']}, backpack {ds.attrs['backpack_version']}; commit "
        f"`{ds.attrs['git_commit'][:10]}`; {ds.attrs['created_at']}.",
        "",
    ]
    batches = [int(b) for b in ds["batch"].values]
    head = "| method | " + " | ".join(f"B={b}" for b in batches) + " |"
    rule = "|---|" + "---:|" * len(batches)
    for model in ds["model"].values:
        n = int(_at(ds, model=model)["n_params"])
        desc = _coord(ds, "model_description", "model", model)
        lines += [f"### {model}: {desc} ({n:,} parameters)", ""]
        tables = [("time_ratio", "Time (wall clock)"), ("memory_ratio", "Peak memory")]
        if ds.attrs["device"] == "cpu":
            tables.insert(1, ("cpu_time_ratio", _CPU_TIME_TITLE))
        for var, title in tables:
            lines += [f"{title}, ratio to plain backward (plain row: absolute)", "", head, rule]
            for method in ds["method"].values:
                label = _coord(ds, "method_label", "method", method)
                cells = [_cell(ds, var, model, b, method) for b in batches]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "### Agreement with the per-example autograd loop",
        "",
        "| model | " + " | ".join(ds["method"].values) + " |",
        "|---|" + "---|" * ds.sizes["method"],
    ]
    for model in ds["model"].values:
        cells = []
        for method in ds["method"].values:
            at = _at(ds, model=model, method=method)
            status = str(at["agreement_status"].item())
            err = float(at["agreement_error"].item())
            if status == "ok":
                cells.append(f"ok ({err:.0e})" if math.isfinite(err) else "n/a (no gradient)")
            else:
                cells.append(status)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    notes = []
    for model in ds["model"].values:
        for method in ds["method"].values:
            note = str(_at(ds, model=model, method=method)["agreement_note"].item())
            if note:
                notes.append(f"- {model} / {method}: {note}")
            for batch in ds["batch"].values:
                at = _at(ds, model=model, batch=batch, method=method)
                if str(at["status"].item()) in ("failed", "error"):
                    notes.append(f"- {model} / {method} / B={batch}: {at['note'].item()}")
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def plot(ds: xr.Dataset, path: Path) -> None:
    """Time and peak memory against batch size, one row per model, log-log axes."""
    models = list(ds["model"].values)
    fig = Figure(figsize=(11, 3.2 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for method in ds["method"].values:
            at = _at(ds, model=model, method=method)
            ok = at["status"] == "ok"
            if not bool(ok.any()):
                continue
            label = _coord(ds, "method_label", "method", method)
            style = {
                "marker": "o",
                "label": label,
                "lw": 2.5 if method == "plain" else 1.5,
                "color": {"plain": "black", "write_floor": "grey"}.get(method),
                "ls": "--" if METHODS[method].kind == "floor" else "-",
            }
            batch = at["batch"].values[ok.values]
            row[0].plot(batch, at["time_median"].values[ok.values], **style)
            row[1].plot(batch, at["peak_memory"].values[ok.values] / 2**20, **style)
        row[0].set(
            xscale="log",
            yscale="log",
            xlabel="batch size",
            ylabel="median time (s)",
            title=f"{model}: time",
        )
        row[1].set(
            xscale="log",
            yscale="log",
            xlabel="batch size",
            ylabel="peak memory increase (MiB)",
            title=f"{model}: peak memory",
        )
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
    axes[0][1].legend(fontsize=8, loc="upper left")
    fig.suptitle(ds.attrs["device_name"])
    fig.savefig(path, dpi=120)


def load_average() -> float:
    """The 1-minute load average, or NaN where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")
