"""Labelled records of a training run, written incrementally to netCDF4.

A :class:`Recorder` is declared once with its :class:`Variable` s and then fed
one call of :meth:`Recorder.log` per step. The first dim of every variable is
its *record dim* (``"step"``, or for example ``"example_step"`` for
per-example arrays stored every few steps): each record dim grows by one row,
at the logged step, whenever one of its variables is logged, and has an int64
coordinate of the same name holding those steps. Float variables of a record
dim that gets a row but no value read as NaN.

With a path, rows are buffered and appended to a netCDF4 file every
``flush_every`` rows and on :meth:`Recorder.close`; the file is closed between
flushes, so a killed process leaves a readable file holding every row up to
its last flush. Without a path, everything stays in memory. Either way
:meth:`Recorder.dataset` returns the ``xarray.Dataset`` of everything logged,
and :func:`open_run` reads a file back.

Example:
    >>> import torch
    >>> variables = {
    ...     "loss": Variable(("step",), "training loss"),
    ...     "accuracy": Variable(("step",), "test accuracy"),
    ...     "grad_norm": Variable(("step", "layer"), "gradient norm per layer"),
    ... }
    >>> rec = Recorder(None, variables, coords={"layer": ["net.0", "net.2"]})
    >>> rec.log(0, loss=2.5, accuracy=0.25, grad_norm=torch.tensor([1.0, 2.0]))
    >>> rec.log(1, loss=torch.tensor(1.5, requires_grad=True), grad_norm=[3.0, 4.0])
    >>> ds = rec.dataset()
    >>> dict(ds.sizes)
    {'step': 2, 'layer': 2}
    >>> ds["accuracy"].values.tolist()
    [0.25, nan]
    >>> ds["grad_norm"].sel(layer="net.2").values.tolist()
    [2.0, 4.0]
"""

from __future__ import annotations

import operator
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

import netCDF4
import numpy as np
import torch
import xarray as xr

from gradlens.provenance import make_attrs

__all__ = ["Recorder", "Variable", "open_run"]

DType = Literal["float32", "float64", "int64", "int32"]

_STEP_ATTRS = {"long_name": "training step", "units": "1"}


@dataclass(frozen=True)
class Variable:
    """The declaration of one recorded variable.

    Attributes:
        dims: Dim names; the first is the variable's record dim, along which
            it grows by one row per logged step.
        long_name: What the variable is, for people and plots.
        units: Its units, ``"1"`` when dimensionless.
        dtype: ``"float32"``, ``"float64"``, ``"int64"`` or ``"int32"``.
            Float variables read NaN where not logged; int variables must be
            logged at every row of their record dim.
        coord: Make it a non-dimension coordinate (for example ``"epoch"``
            along ``"step"``) instead of a data variable.
    """

    dims: tuple[str, ...]
    long_name: str
    units: str = "1"
    dtype: DType = "float32"
    coord: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dims, str) or not self.dims:
            raise TypeError(
                f"dims must be a non-empty tuple of dim names such as ('step',), got {self.dims!r}."
            )
        if self.dtype not in ("float32", "float64", "int64", "int32"):
            raise ValueError(
                f"dtype must be 'float32', 'float64', 'int64' or 'int32', got {self.dtype!r}."
            )

    @property
    def is_float(self) -> bool:
        """Whether missing rows are filled with NaN."""
        return self.dtype.startswith("float")


class _Schema(NamedTuple):
    """A validated declaration: variables, labels of non-record dims, record dims in order."""

    variables: dict[str, Variable]
    coords: dict[str, np.ndarray]
    record_dims: tuple[str, ...]


def _make_schema(variables: Mapping[str, Variable], coords: Mapping[str, Sequence[Any]]) -> _Schema:
    """Validate a declaration and return it as a :class:`_Schema`."""
    if not variables:
        raise ValueError("declare at least one variable.")
    record = tuple(dict.fromkeys(var.dims[0] for var in variables.values()))
    all_dims = {dim for var in variables.values() for dim in var.dims}
    for name, var in variables.items():
        if name in all_dims:
            raise ValueError(f"variable {name!r} has the name of a dim; rename it.")
        clash = sorted(set(var.dims[1:]) & set(record))
        if clash:
            raise ValueError(
                f"variable {name!r} has dims {var.dims}, but {clash} are record dims of other "
                "variables, which can only come first."
            )
    for dim in coords:
        if dim in record:
            raise ValueError(f"coords for record dim {dim!r}: its values are the logged steps.")
        if dim not in all_dims:
            raise ValueError(f"coords for {dim!r}, which no variable has; dims: {sorted(all_dims)}")
    labels = {dim: _label_array(dim, values) for dim, values in coords.items()}
    return _Schema(dict(variables), labels, record)


def _label_array(dim: str, values: Sequence[Any]) -> np.ndarray:
    """Return coordinate labels as an int, float or (object) str array."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"coords[{dim!r}] must be one-dimensional, got shape {array.shape}.")
    if array.dtype.kind in "US":
        return array.astype(str)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"coords[{dim!r}] must hold numbers or strings, got {array.dtype}.")
    return array


def _to_numpy(name: str, var: Variable, value: object) -> np.ndarray:
    """Convert a logged value (number, array or tensor on any device) to the declared dtype."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32):
            value = value.double()
        value = value.numpy()
    array = np.asarray(value)
    if not var.is_float and array.dtype.kind not in "iub":
        raise ValueError(f"{name!r} is declared {var.dtype} but got values of {array.dtype}.")
    return array.astype(var.dtype)


def _sized(var: Variable, sizes: Mapping[str, int]) -> bool:
    """Whether the sizes of all of ``var``'s non-record dims are known."""
    return all(dim in sizes for dim in var.dims[1:])


def _block(
    var: Variable, rows: Sequence[np.ndarray | None], sizes: Mapping[str, int]
) -> np.ndarray:
    """Stack rows into shape ``(row, *non-record dims)``, NaN where a row is ``None``."""
    shape = tuple(sizes[dim] for dim in var.dims[1:])
    block = np.full((len(rows), *shape), np.nan if var.is_float else 0, dtype=var.dtype)
    for i, row in enumerate(rows):
        if row is not None:
            block[i] = row
    return block


def _var_attrs(var: Variable) -> dict[str, str]:
    return {"long_name": var.long_name, "units": var.units}


def _label_attrs(dim: str) -> dict[str, str]:
    return {"long_name": dim, "units": "1"}


def _no_rows(schema: _Schema) -> tuple[dict[str, list[int]], dict[str, list[np.ndarray | None]]]:
    """Return empty ``(steps, rows)``: a list per record dim and per variable."""
    return {dim: [] for dim in schema.record_dims}, {name: [] for name in schema.variables}


def _record_dims_hit(
    schema: _Schema, last_step: Mapping[str, int], step: int, names: Collection[str]
) -> tuple[str, ...]:
    """Return the record dims that get a row when ``names`` are logged at ``step``.

    Raises:
        ValueError: For an unknown name, a step not after the last one of a
            record dim, or an int variable of such a dim missing from ``names``.
    """
    unknown = sorted(set(names) - set(schema.variables))
    if unknown:
        raise ValueError(f"unknown variables {unknown}; declared: {list(schema.variables)}.")
    dims = tuple(dict.fromkeys(schema.variables[name].dims[0] for name in names))
    for dim in dims:
        last = last_step.get(dim)
        if last is not None and step <= last:
            raise ValueError(
                f"steps along {dim!r} must strictly increase: got step {step} after {last}."
            )
        missing = [
            name
            for name, var in schema.variables.items()
            if var.dims[0] == dim and not var.is_float and name not in names
        ]
        if missing:
            raise ValueError(
                f"int variables {missing} have no NaN to fill a row of {dim!r}: log them "
                f"whenever {dim!r} gets a row (step {step})."
            )
    return dims


def _fit_shape(
    name: str, var: Variable, array: np.ndarray, sizes: Mapping[str, int]
) -> dict[str, int]:
    """Check ``array`` against the known sizes of ``var``'s non-record dims.

    Returns:
        ``sizes`` with the sizes of ``var``'s dims that were not known yet.

    Raises:
        ValueError: Naming the variable, its dims, the expected and the given shape.
    """
    dims = var.dims[1:]
    expected = tuple(sizes.get(dim, dim) for dim in dims)
    if array.ndim != len(dims) or any(
        sizes.get(dim, n) != n for dim, n in zip(dims, array.shape, strict=True)
    ):
        raise ValueError(
            f"{name!r} has dims {var.dims}, so each row has shape {expected}, but got a value "
            f"of shape {array.shape}."
        )
    return {**sizes, **dict(zip(dims, array.shape, strict=True))}


def _build_dataset(
    schema: _Schema,
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
        dim: xr.Variable(dim, np.asarray(s, np.int64), _STEP_ATTRS) for dim, s in steps.items()
    }
    coords |= {
        dim: xr.Variable(dim, labels, _label_attrs(dim)) for dim, labels in schema.coords.items()
    }
    data_vars = {}
    for name, var in schema.variables.items():
        if _sized(var, sizes):
            built = xr.Variable(var.dims, _block(var, rows[name], sizes), _var_attrs(var))
            (coords if var.coord else data_vars)[name] = built
    return xr.Dataset(data_vars, coords, dict(attrs))


def _append_netcdf(
    path: Path,
    schema: _Schema,
    sizes: Mapping[str, int],
    steps: Mapping[str, Sequence[int]],
    rows: Mapping[str, Sequence[np.ndarray | None]],
    attrs: Mapping[str, Any] | None,
) -> None:
    """Append rows to a netCDF4 file, opening and closing it here (the file path).

    ``steps`` and ``rows`` hold the new rows as in :func:`_build_dataset`. With
    ``attrs`` the file is created first (never over an existing one); without,
    it is appended to. Dims and variables join the file once their sizes are
    known; float entries never written read as their fill value, NaN.
    """
    with netCDF4.Dataset(path, "a" if attrs is None else "w", clobber=False) as nc:
        if attrs is not None:
            nc.setncatts(dict(attrs))
            names = [name for name, var in schema.variables.items() if var.coord]
            if names:
                nc.setncattr("coordinates", " ".join(names))
            for dim in schema.record_dims:
                nc.createDimension(dim, None)
                nc.createVariable(dim, "i8", (dim,), fill_value=False).setncatts(_STEP_ATTRS)
        for dim, size in sizes.items():
            if dim not in nc.dimensions:
                nc.createDimension(dim, size)
                if dim in schema.coords:
                    labels = schema.coords[dim]
                    is_str = labels.dtype.kind == "U"
                    label_var = nc.createVariable(
                        dim, str if is_str else labels.dtype, (dim,), fill_value=False
                    )
                    label_var.setncatts(_label_attrs(dim))
                    label_var[:] = labels.astype(object) if is_str else labels
        for name, var in schema.variables.items():
            if name not in nc.variables and _sized(var, sizes):
                fill = np.nan if var.is_float else False
                nc.createVariable(name, var.dtype, var.dims, fill_value=fill).setncatts(
                    _var_attrs(var)
                )
        for dim, new_steps in steps.items():
            start = len(nc.dimensions[dim])
            stop = start + len(new_steps)
            nc.variables[dim][start:stop] = np.asarray(new_steps, np.int64)
            for name, var in schema.variables.items():
                given = any(row is not None for row in rows[name])
                if var.dims[0] == dim and given and name in nc.variables:
                    nc.variables[name][start:stop] = _block(var, rows[name], sizes)


def open_run(path: str | os.PathLike[str]) -> xr.Dataset:
    """Read a recorded run fully into memory; the file is closed afterwards.

    Args:
        path: A file written by :class:`Recorder`, complete or cut short.

    Returns:
        The dataset, with the same dims, coords and attrs as the in-memory one.
    """
    return xr.load_dataset(path, engine="netcdf4", decode_times=False, decode_timedelta=False)


class Recorder:
    """Record labelled rows of a training run, in memory or into a netCDF4 file.

    Args:
        path: The netCDF4 file to write, or ``None`` to keep every row in memory.
        variables: The variables to record, by name.
        coords: Labels of non-record dims, for example ``{"layer": ["net.0", "net.2"]}``;
            a non-record dim without labels takes its size from the first value logged.
        attrs: Extra dataset attrs (str, int or float), merged over ``make_attrs(config)``.
        config: The run's config (a dataclass or Mapping), stored as JSON in the attrs.
        flush_every: With a path, append the buffered rows to the file whenever
            a record dim has this many.
        overwrite: Replace an existing file at ``path``; without it that is an error.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is not set.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        variables: Mapping[str, Variable],
        *,
        coords: Mapping[str, Sequence[Any]] | None = None,
        attrs: Mapping[str, str | int | float] | None = None,
        config: object | None = None,
        flush_every: int = 50,
        overwrite: bool = False,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}.")
        for key, value in (attrs or {}).items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError(
                    f"attrs[{key!r}] is a {type(value).__name__}; netCDF attrs must be str, "
                    "int or float (store structured values as a JSON string)."
                )
        self._schema = _make_schema(variables, coords or {})
        self._sizes = {dim: len(labels) for dim, labels in self._schema.coords.items()}
        self._attrs = {**make_attrs(config), **(attrs or {})}
        self._flush_every = flush_every
        self._path = None if path is None else Path(path)
        if self._path is not None and self._path.exists():
            if not overwrite:
                raise FileExistsError(
                    f"{self._path} already exists; pass overwrite=True to replace it, or "
                    "choose another path."
                )
            self._path.unlink()
        self._created = False
        self._closed = False
        self._last_step: dict[str, int] = {}
        self._steps, self._rows = _no_rows(self._schema)

    @property
    def path(self) -> Path | None:
        """The file written, or ``None`` in memory."""
        return self._path

    def log(self, step: int, **values: float | int | torch.Tensor | np.ndarray) -> None:
        """Record values at a training step.

        Each value becomes the row at ``step`` of its variable's record dim;
        other float variables of that record dim read NaN in that row.

        Args:
            step: The training step; must exceed the last step of every record
                dim that gets a row.
            **values: By variable name, a number or an array shaped like the
                variable's non-record dims; tensors may be on any device and
                require grad.

        Raises:
            ValueError: For an unknown name, a step that does not increase, a
                shape that disagrees with earlier values or coords, a missing
                int variable, or a closed recorder.
        """
        if self._closed:
            raise ValueError("this Recorder is closed; create a new one to record more.")
        step = operator.index(step)
        if not values:
            raise ValueError(f"log({step}) got no values; pass them as name=value.")
        dims = _record_dims_hit(self._schema, self._last_step, step, values.keys())
        variables = self._schema.variables
        arrays = {name: _to_numpy(name, variables[name], v) for name, v in values.items()}
        sizes = self._sizes
        for name, array in arrays.items():
            sizes = _fit_shape(name, variables[name], array, sizes)
        self._sizes = sizes
        for dim in dims:
            self._last_step[dim] = step
            self._steps[dim].append(step)
            for name, var in self._schema.variables.items():
                if var.dims[0] == dim:
                    self._rows[name].append(arrays.get(name))
        if self._path is not None and max(map(len, self._steps.values())) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Append the buffered rows to the file (creating it the first time); no-op in memory."""
        if self._path is None or (self._created and not any(self._steps.values())):
            return
        attrs = None if self._created else self._attrs
        _append_netcdf(self._path, self._schema, self._sizes, self._steps, self._rows, attrs)
        self._created = True
        self._steps, self._rows = _no_rows(self._schema)

    def close(self) -> None:
        """Flush and stop recording; calling it again does nothing."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def dataset(self) -> xr.Dataset:
        """Return everything logged so far; with a path, flush and read the file back."""
        if self._path is not None:
            self.flush()
            return open_run(self._path)
        return _build_dataset(self._schema, self._sizes, self._steps, self._rows, self._attrs)
