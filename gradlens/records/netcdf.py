"""Appending a recorder's rows to a netCDF4 file, and reading its completeness marker (private).

:func:`append_netcdf` creates the file on the first flush and appends to it on
later ones, opening and closing it each time, so a killed process leaves a
readable file holding every row up to its last flush. The layout matches
:mod:`gradlens.records.dataset`: record dims are unlimited, with int64 step
coordinates, and the other dims are fixed, with their labels.

Rows go to the positions the caller gives (the rows already written), not
after the file's last row: a flush interrupted halfway (``KeyboardInterrupt``)
and done again overwrites its own half-written rows instead of appending
them twice. The file is closed on every path out, a failed one included: when
closing fails because the disk is full, the file (which the caller then
deletes) is emptied first so that the second close has room, and the handle
does not keep the space of a deleted file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np

from gradlens.records.interrupts import interrupts_held
from gradlens.records.schema import STEP_ATTRS, Schema, block, label_attrs, sized, var_attrs

COMPLETE = "complete"
"""The global attr that marks a file complete (1) or not yet (0); see ``is_complete``."""


def append_netcdf(
    path: Path,
    schema: Schema,
    sizes: Mapping[str, int],
    offsets: Mapping[str, int] | None,
    steps: Mapping[str, Sequence[int]],
    rows: Mapping[str, Sequence[np.ndarray | None]],
    attrs: Mapping[str, Any],
    *,
    complete: bool = False,
) -> None:
    """Write rows into a netCDF4 file, opening and closing it here (the file path).

    ``steps`` and ``rows`` hold the new rows as in
    :func:`~gradlens.records.dataset.build_dataset`; the rows of record dim
    ``dim`` go to positions ``offsets[dim]`` on. With ``offsets=None`` the
    file is created first, with ``attrs`` and ``complete = 0`` (replacing
    any file there: it is the caller's private scratch). Dims and variables
    join the file once their sizes are known; float entries never written
    read as their fill value, NaN. ``complete`` sets the ``complete`` attr to 1.
    """
    with interrupts_held():  # netCDF4's bare ``except:`` clauses would swallow or recast Ctrl-C
        nc = netCDF4.Dataset(path, "w" if offsets is None else "a", clobber=True)
        try:
            if offsets is None:
                _create(nc, schema, attrs)
                offsets = dict.fromkeys(schema.record_dims, 0)
            _write(nc, schema, sizes, offsets, steps, rows)
            if complete:
                nc.setncattr(COMPLETE, 1)
        except (OSError, RuntimeError):
            with contextlib.suppress(OSError, RuntimeError):
                _close(nc, path)
            raise  # the write's error, which names the cause better than the close's
        except BaseException:
            _close(nc, path)  # a close that fails too raises here, in place of the interruption
            raise
        _close(nc, path)


def _create(nc: netCDF4.Dataset, schema: Schema, attrs: Mapping[str, Any]) -> None:
    """Write the header: attrs, the not-complete marker and the record dims."""
    nc.setncatts({**attrs, COMPLETE: 0})
    names = [name for name, var in schema.variables.items() if var.coord]
    if names:
        nc.setncattr("coordinates", " ".join(names))
    for dim in schema.record_dims:
        nc.createDimension(dim, None)
        nc.createVariable(dim, "i8", (dim,), fill_value=False).setncatts(STEP_ATTRS)


def _write(
    nc: netCDF4.Dataset,
    schema: Schema,
    sizes: Mapping[str, int],
    offsets: Mapping[str, int],
    steps: Mapping[str, Sequence[int]],
    rows: Mapping[str, Sequence[np.ndarray | None]],
) -> None:
    """Add the dims and variables whose sizes became known, then the rows."""
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
            nc.createVariable(name, var.dtype, var.dims, fill_value=fill).setncatts(var_attrs(var))
    for dim, new_steps in steps.items():
        start = offsets[dim]
        stop = start + len(new_steps)
        nc.variables[dim][start:stop] = np.asarray(new_steps, np.int64)
        for name, var in schema.variables.items():
            given = any(row is not None for row in rows[name])
            if var.dims[0] == dim and given and name in nc.variables:
                nc.variables[name][start:stop] = block(var, rows[name], sizes)


def _close(nc: netCDF4.Dataset, path: Path) -> None:
    """Close ``nc``; if that fails (a full disk), empty the file and close it again, then raise.

    A failed ``nc_close`` leaves the file open inside the netCDF library, so
    deleting it would not free its space. Emptying it frees the space, and the
    second close, which has room for the metadata it writes, releases the handle.
    """
    try:
        nc.close()
    except (OSError, RuntimeError):
        if nc.isopen():
            with contextlib.suppress(OSError):
                os.truncate(path, 0)
            with contextlib.suppress(OSError, RuntimeError):
                nc.close()
        raise


def read_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path``'s global ``complete`` attr is the integer 1 (see ``is_complete``)."""
    try:
        nc = netCDF4.Dataset(path, "r")
    except OSError as exc:  # missing, or not netCDF (netCDF's own codes are negative)
        if exc.errno == errno.ENOENT or (isinstance(exc.errno, int) and exc.errno < 0):
            return False
        raise
    try:
        value = nc.getncattr(COMPLETE) if COMPLETE in nc.ncattrs() else None
    except (OSError, RuntimeError):  # a header cut short
        return False
    finally:
        nc.close()
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == 1
