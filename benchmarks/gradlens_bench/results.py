"""The one results format: a labelled dataset, written as ``results.nc``.

Dims ``model``, ``batch`` and ``method`` for the measurements and ``model``,
``method`` for the agreement checks; each method's ``baseline`` is a
coordinate, and every ratio divides by the baseline of the same model and
batch. Provenance (device, library versions, git commit, configuration) is
stamped in the attrs.
"""

from __future__ import annotations

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

from gradlens.records.provenance import make_attrs
from gradlens_bench.methods import METHODS
from gradlens_bench.models import MODELS

__all__ = ["ROOT", "add_ratios", "build_dataset", "device_slug", "load_average", "provenance"]

ROOT = Path(__file__).resolve().parents[2]
"""The repository root."""

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
_RATIOS = {
    "time_ratio": ("time_median", "median time / baseline"),
    "cpu_time_ratio": ("cpu_time_median", "median process CPU time / baseline"),
    "memory_ratio": ("peak_memory", "peak memory / baseline"),
}


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    """A folder name for the device, for example ``cpu-intel-xeon-processor-1t``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = re.sub(r"\((R|TM)\)|\bCPU\b|@.*", " ", device_name(device).rsplit(",", 1)[0])
        name = f"cpu {cpu} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _changed_paths() -> str:
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--", "gradlens", "benchmarks"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def provenance(device: torch.device, config: object) -> dict[str, str | int]:
    """Attrs: :func:`gradlens.records.make_attrs` plus the device and the rivals' versions.

    netCDF attrs must be strings or numbers, so the working-tree state is the
    list of changed paths (``""`` when clean) and TF32 a word.
    """
    return {
        **make_attrs(config),
        "device": str(device),
        "device_name": device_name(device),
        "torch_num_threads": torch.get_num_threads(),
        "tf32": "disabled",
        "opacus_version": _version("opacus"),
        "backpack_version": _version("backpack-for-pytorch"),
        "platform": platform.platform(),
        "git_changed_paths": _changed_paths(),
    }


def load_average() -> float:
    """The 1-minute load average, or NaN where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _grid(shape: tuple[int, ...], fill: object, dtype: object) -> np.ndarray:
    return np.full(shape, fill, dtype=dtype)


def build_dataset(
    records: Sequence[Mapping[str, object]],
    agreements: Mapping[tuple[str, str], Mapping[str, object]],
    *,
    models: Sequence[str],
    batches: Sequence[int],
    methods: Sequence[str],
    attrs: Mapping[str, str | int],
) -> xr.Dataset:
    """Arrange case records and agreement checks into the results dataset.

    Args:
        records: One mapping per case with ``model``, ``batch``, ``method``,
            ``status``, ``note`` and, when measured, the fields of ``_VARIABLES``.
        agreements: ``(model, method)`` -> mapping with ``status``, ``error``, ``note``.
        models: Model names, in order.
        batches: Batch sizes, in order.
        methods: Method names, in order; every method's baseline among them.
        attrs: Provenance attrs.

    Returns:
        The dataset, with the ratios of :func:`add_ratios`.
    """
    dims, pair = ("model", "batch", "method"), ("model", "method")
    shape = (len(models), len(batches), len(methods))
    data = {k: _grid(shape, fill, float) for k, (_, _, fill) in _VARIABLES.items()}
    status, note = _grid(shape, "not run", object), _grid(shape, "", object)
    for r in records:
        at = (models.index(r["model"]), batches.index(r["batch"]), methods.index(r["method"]))
        status[at], note[at] = r["status"], r.get("note", "")
        for key, grid in data.items():
            grid[at] = r.get(key, grid[at])
    check = {
        k: _grid(shape[::2], "not run" if k == "status" else "", object) for k in ("status", "note")
    }
    error = _grid(shape[::2], np.nan, float)
    for (model, method), a in agreements.items():
        at = (models.index(model), methods.index(method))
        check["status"][at], check["note"][at], error[at] = a["status"], a["note"], a["error"]
    ds = xr.Dataset(
        coords={
            "model": list(models),
            "batch": list(batches),
            "method": list(methods),
            "method_label": ("method", [METHODS[m].label for m in methods]),
            "baseline": ("method", [METHODS[m].baseline for m in methods]),
            "model_description": ("model", [MODELS[m].description for m in models]),
        },
        attrs=dict(attrs),
    )
    for key, (long_name, units, _) in _VARIABLES.items():
        ds[key] = (dims, data[key], {"long_name": long_name, "units": units})
    ds["repeats"] = ds["repeats"].astype(np.int64)
    ds["status"] = (dims, status, {"long_name": "outcome of the case", "units": "1"})
    ds["note"] = (dims, note, {"long_name": "why a case was not measured", "units": "1"})
    ds["agreement_status"] = (pair, check["status"], {"long_name": "agreement check", "units": "1"})
    ds["agreement_note"] = (pair, check["note"], {"long_name": "agreement detail", "units": "1"})
    ds["agreement_error"] = (
        pair,
        error,
        {"long_name": "max relative error against the method's reference", "units": "1"},
    )
    ds["n_params"] = (
        "model",
        [sum(p.numel() for p in MODELS[m].build().parameters() if p.requires_grad) for m in models],
        {"long_name": "trainable parameters", "units": "1"},
    )
    return add_ratios(ds)


def add_ratios(ds: xr.Dataset) -> xr.Dataset:
    """Add (or refresh) every ratio to the method's baseline at the same model and batch.

    Results written before methods had a ``baseline`` coordinate divide by ``plain``.
    """
    methods = list(ds["method"].values)
    baselines = ds["baseline"].values if "baseline" in ds.coords else ["plain"] * len(methods)
    index = [methods.index(b) for b in baselines]
    ratios = {
        name: ds[var]
        .copy(data=ds[var].values / ds[var].values[..., index])
        .assign_attrs(long_name=long_name, units="1")
        for name, (var, long_name) in _RATIOS.items()
        if var in ds
    }
    return ds.assign(ratios)
