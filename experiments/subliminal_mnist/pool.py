"""Pooling conditions of several runs of the same models, so that they pair model by model."""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["IDENTITY", "pool_runs"]

IDENTITY = ("teacher_accuracy", "reference_accuracy")
"""Per-model values that agree exactly between two runs of the same models."""


def pool_runs(runs: list[tuple[xr.Dataset, list[str] | None]], keep: tuple[str, ...]) -> xr.Dataset:
    """The given conditions of several runs of the same models, along ``condition``.

    Args:
        runs: ``(dataset, conditions)`` pairs; ``conditions=None`` takes all of
            that run's. A condition named twice is taken from its first run.
        keep: The variables to pool (those missing from a run are left out).

    Returns:
        One dataset, the conditions in the order given, with the first run's
        ``teacher_accuracy`` and ``reference_accuracy``.

    Raises:
        ValueError: The runs are not of the same models (a teacher or
            untrained-reference accuracy differs), or a named condition is missing.
    """
    first = runs[0][0]
    names = [v for v in keep if all(v in ds for ds, _ in runs)]
    parts, seen = [], set()
    for ds, conditions in runs:
        for name in IDENTITY:
            if not np.array_equal(ds[name].values, first[name].values):
                raise ValueError(
                    f"{name} differs between the runs: they are not of the same models "
                    "(seeds, teachers), so their conditions cannot be paired."
                )
        wanted = list(ds.condition.values) if conditions is None else conditions
        missing = sorted(set(wanted) - set(map(str, ds.condition.values)))
        if missing:
            raise ValueError(f"condition(s) {missing} are not in the run.")
        wanted = [c for c in wanted if c not in seen]
        seen.update(wanted)
        if wanted:
            parts.append(ds[[v for v in names if v not in IDENTITY]].sel(condition=wanted))
    pooled = xr.concat(parts, dim="condition", data_vars="minimal", coords="minimal",
                       compat="override", join="outer")  # fmt: skip
    for name in IDENTITY:
        pooled[name] = first[name]
    return pooled
