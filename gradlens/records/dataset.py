"""The in-memory ``xarray.Dataset`` of a recorder's rows (private).

:func:`build_dataset` lays out buffered rows with xarray alone, the same way
:mod:`gradlens.records.netcdf` lays them out in a file, so that a recorder
without a path returns the dataset that :func:`~gradlens.records.recorder.open_run`
would read back from one with a path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from gradlens.records.schema import STEP_ATTRS, Schema, block, label_attrs, sized, var_attrs


def build_dataset(
    schema: Schema,
    sizes: Mapping[str, int],
    steps: Mapping[str, Sequence[int]],
    rows: Mapping[str, Sequence[np.ndarray | None]],
    attrs: Mapping[str, Any],
) -> xr.Dataset:
    """Build the dataset of all rows with xarray alone (the in-memory path).

    ``steps[dim]`` holds the step of each row of record dim ``dim``, and
    ``rows[name]`` one value or ``None`` per row of ``name``'s record dim.
    Variables whose non-record dims have no size yet are left out.
    """
    coords = {
        dim: xr.Variable(dim, np.asarray(s, np.int64), STEP_ATTRS) for dim, s in steps.items()
    }
    coords |= {
        dim: xr.Variable(dim, labels, label_attrs(dim)) for dim, labels in schema.coords.items()
    }
    data_vars = {}
    for name, var in schema.variables.items():
        if sized(var, sizes):
            built = xr.Variable(var.dims, block(var, rows[name], sizes), var_attrs(var))
            (coords if var.coord else data_vars)[name] = built
    return xr.Dataset(data_vars, coords, dict(attrs))
