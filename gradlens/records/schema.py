"""What a :class:`~gradlens.records.recorder.Recorder`'s declaration means (private).

A declaration of :class:`Variable` s (re-exported as ``gradlens.Variable``)
and coords becomes a validated :class:`Schema`. Here too are the checks every logged row must pass
against it (:func:`record_dims_hit`, :func:`to_numpy`, :func:`fit_shape`) and
the arrays and attrs a buffer of rows becomes (:func:`block`,
:func:`var_attrs`, :func:`label_attrs`), shared by the in-memory dataset
builder and the netCDF4 writer so that both lay out rows the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

STEP_ATTRS = {"long_name": "training step", "units": "1"}

DType = Literal["float32", "float64", "int64", "int32"]


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


class Schema(NamedTuple):
    """A validated declaration: variables, labels of non-record dims, record dims in order."""

    variables: dict[str, Variable]
    coords: dict[str, np.ndarray]
    record_dims: tuple[str, ...]


def make_schema(variables: Mapping[str, Variable], coords: Mapping[str, Sequence[Any]]) -> Schema:
    """Validate a declaration and return it as a :class:`Schema`."""
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
    return Schema(dict(variables), labels, record)


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


def no_rows(schema: Schema) -> tuple[dict[str, list[int]], dict[str, list[np.ndarray | None]]]:
    """Return empty ``(steps, rows)``: a list per record dim and per variable."""
    return {dim: [] for dim in schema.record_dims}, {name: [] for name in schema.variables}


def record_dims_hit(
    schema: Schema, last_step: Mapping[str, int], step: int, names: Collection[str]
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


def to_numpy(name: str, var: Variable, value: object) -> np.ndarray:
    """Convert a logged value (number, array or tensor on any device) to the declared dtype.

    Raises:
        ValueError: For a value that the declared dtype would store as another
            number: a float, complex, string or ``None`` for an int variable,
            a complex, string or ``None`` for a float one, an integer out of
            the int dtype's range or that the float dtype cannot hold exactly,
            or a finite value out of the float dtype's range (it would read as
            infinity). NaN and infinities are kept.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32):
            value = value.double()
        value = value.numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name!r} got a value numpy cannot hold as one array: {exc}") from exc
    kind = array.dtype.kind
    if kind == "O" and array.size and all(isinstance(v, int) for v in array.flat):
        # Python ints beyond int64: report them as out of range below.
        _check_int_range(name, var, min(array.flat), max(array.flat))
    if kind not in ("iub" if not var.is_float else "iubf"):
        wanted = "integers (or bools)" if not var.is_float else "real numbers"
        raise ValueError(
            f"{name!r} is declared {var.dtype} but got values of {array.dtype} "
            f"({_describe(value)}); log {wanted}, or declare the variable with another dtype."
        )
    if not var.is_float:
        if array.size:
            _check_int_range(name, var, int(array.min()), int(array.max()))
        return array.astype(var.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        stored = array.astype(var.dtype)
    if kind in "iu" and array.size and not np.array_equal(stored.astype(array.dtype), array):
        bad = array[stored.astype(array.dtype) != array].flat[0]
        raise ValueError(
            f"{name!r} is declared {var.dtype}, which cannot hold the integer {int(bad)} "
            f"exactly (it would store {int(stored[stored.astype(array.dtype) != array].flat[0])}"
            "); declare it dtype='float64' or dtype='int64'."
        )
    if kind == "f" and array.size:
        overflow = np.isfinite(array) & ~np.isfinite(stored)
        if overflow.any():
            raise ValueError(
                f"{name!r} is declared {var.dtype}, whose largest value is "
                f"{np.finfo(var.dtype).max:.3g}, but got {float(array[overflow].flat[0])!r}, which "
                "would be stored as infinity; declare it dtype='float64' or rescale it."
            )
    return stored


def _check_int_range(name: str, var: Variable, low: int, high: int) -> None:
    """Raise if integers from ``low`` to ``high`` do not fit ``var``'s int dtype."""
    if var.is_float:
        return
    info = np.iinfo(var.dtype)
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        wider = "declare it dtype='int64'" if var.dtype == "int32" else "declare it as a float"
        raise ValueError(
            f"{name!r} is declared {var.dtype}, which holds {info.min}..{info.max}, but got "
            f"{bad}, which it would store as another number; {wider}."
        )


def _describe(value: object) -> str:
    """A short text naming a logged value, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fit_shape(
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


def sized(var: Variable, sizes: Mapping[str, int]) -> bool:
    """Whether the sizes of all of ``var``'s non-record dims are known."""
    return all(dim in sizes for dim in var.dims[1:])


def block(var: Variable, rows: Sequence[np.ndarray | None], sizes: Mapping[str, int]) -> np.ndarray:
    """Stack rows into shape ``(row, *non-record dims)``, NaN where a row is ``None``."""
    shape = tuple(sizes[dim] for dim in var.dims[1:])
    array = np.full((len(rows), *shape), np.nan if var.is_float else 0, dtype=var.dtype)
    for i, row in enumerate(rows):
        if row is not None:
            array[i] = row
    return array


def var_attrs(var: Variable) -> dict[str, str]:
    """Return the ``long_name`` and ``units`` attrs of a variable."""
    return {"long_name": var.long_name, "units": var.units}


def label_attrs(dim: str) -> dict[str, str]:
    """Return the attrs of the labels of a non-record dim."""
    return {"long_name": dim, "units": "1"}
