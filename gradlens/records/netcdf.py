"""Appending a recorder's rows to a netCDF4 file (private).

:func:`append_netcdf` creates the file on the first flush and appends to it on
later ones, opening and closing it each time, so a killed process leaves a
readable file holding every row up to its last flush. The layout matches
:mod:`gradlens.records.dataset`: record dims are unlimited, with int64 step
coordinates, and the other dims are fixed, with their labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np

from gradlens.records.schema import STEP_ATTRS, Schema, block, label_attrs, sized, var_attrs


def append_netcdf(
    path: Path,
    schema: Schema,
    sizes: Mapping[str, int],
    steps: Mapping[str, Sequence[int]],
    rows: Mapping[str, Sequence[np.ndarray | None]],
    attrs: Mapping[str, Any] | None,
) -> None:
    """Append rows to a netCDF4 file, opening and closing it here (the file path).

    ``steps`` and ``rows`` hold the new rows as in
    :func:`~gradlens.records.dataset.build_dataset`. With ``attrs`` the file
    is created first (never over an existing one); without, it is appended to.
    Dims and variables join the file once their sizes are known; float entries
    never written read as their fill value, NaN.
    """
    with netCDF4.Dataset(path, "a" if attrs is None else "w", clobber=False) as nc:
        if attrs is not None:
            nc.setncatts(dict(attrs))
            names = [name for name, var in schema.variables.items() if var.coord]
            if names:
                nc.setncattr("coordinates", " ".join(names))
            for dim in schema.record_dims:
                nc.createDimension(dim, None)
                nc.createVariable(dim, "i8", (dim,), fill_value=False).setncatts(STEP_ATTRS)
        for dim, size in sizes.items():
            if dim not in nc.dimensions:
                nc.createDimension(dim, size)
                if dim in schema.coords:
                    labels = schema.coords[dim]
                    is_str = labels.dtype.kind == "U"
                    label_var = nc.createVariable(
                        dim, str if is_str else labels.dtype, (dim,), fill_value=False
                    )
                    label_var.setncatts(label_attrs(dim))
                    label_var[:] = labels.astype(object) if is_str else labels
        for name, var in schema.variables.items():
            if name not in nc.variables and sized(var, sizes):
                fill = np.nan if var.is_float else False
                nc.createVariable(name, var.dtype, var.dims, fill_value=fill).setncatts(
                    var_attrs(var)
                )
        for dim, new_steps in steps.items():
            start = len(nc.dimensions[dim])
            stop = start + len(new_steps)
            nc.variables[dim][start:stop] = np.asarray(new_steps, np.int64)
            for name, var in schema.variables.items():
                given = any(row is not None for row in rows[name])
                if var.dims[0] == dim and given and name in nc.variables:
                    nc.variables[name][start:stop] = block(var, rows[name], sizes)
