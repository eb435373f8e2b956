"""What a :class:`~gradlens.records.recorder.Recorder`'s declaration means (private).

A declaration of :class:`Variable` s (re-exported as ``gradlens.Variable``)
and coords becomes a validated :class:`Schema`. Here too are the checks every logged row must pass
against it (:func:`record_dims_hit`, :func:`to_numpy`, :func:`fit_shape`) and
the arrays and attrs a buffer of rows becomes (:func:`block`,
:func:`var_attrs`, :func:`label_attrs`), shared by the in-memory dataset
builder and the netCDF4 writer so that both lay out rows the same way. And
the rules of what netCDF stores unchanged (:func:`check_name`,
:func:`check_text`, :func:`check_attrs`), applied when a recorder is made.
"""

from __future__ import annotations

import unicodedata
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
    for dim in sorted(all_dims):
        check_name("dim", dim)
    for name, var in variables.items():
        check_name("variable", name)
        if var.coord and any(c.isspace() for c in name):
            raise ValueError(
                f"coordinate variable {name!r} has whitespace in its name: netCDF lists "
                "coordinates in one space-separated attr, so it would read back as a data "
                "variable; use '_' instead."
            )
        check_text(f"variables[{name!r}].long_name", var.long_name)
        check_text(f"variables[{name!r}].units", var.units)
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
    for label in values:
        if isinstance(label, str):  # before numpy, which drops trailing NULs silently
            check_text(f"coords[{dim!r}] label", label)
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"coords[{dim!r}] must be one-dimensional, got shape {array.shape}.")
    if array.dtype.kind in "US":
        array = array.astype(str)
        for label in array:
            check_text(f"coords[{dim!r}] label", str(label))
        return array
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


MAX_NAME_BYTES = 255
"""The longest netCDF name read back: 256 UTF-8 bytes are written but cannot be read."""


def check_name(what: str, name: object) -> None:
    """Raise unless netCDF stores ``name`` and reads it back unchanged.

    The rules were found by writing variable, dim and attr names with the
    installed netCDF4 (4.10, HDF5 2.2) and reading them back: ``/`` makes a
    group path (a variable ``"train/loss"`` is written but cannot be read
    back), NUL cuts the name short, a name not in Unicode NFC is stored
    normalised; an empty name, control characters, a first ASCII character
    other than a letter, digit or ``_``, trailing whitespace and more than
    255 UTF-8 bytes are refused by netCDF at the first flush.

    Args:
        what: What the name names (``"variable"``, ``"dim"``, ``"attr"``), for the message.
        name: The name.

    Raises:
        TypeError: If ``name`` is not a string.
        ValueError: Naming the cause and the fix.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} name {name!r} is a {type(name).__name__}; names are strings.")
    problem = _name_problem(name)
    if problem:
        raise ValueError(
            f"{what} name {name!r} {problem}, which netCDF cannot store as a name; rename "
            "it (letters, digits and '_' always work)."
        )


def _name_problem(name: str) -> str | None:
    """What netCDF would refuse or alter in ``name``, or ``None``."""
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    if "/" in name:
        return "contains '/', which netCDF takes as a group path (it could not be read back)"
    bad = [c for c in name if ord(c) < 0x20 or ord(c) == 0x7F]
    if bad:
        return f"contains the control character {bad[0]!r}"
    if ord(name[0]) < 0x80 and not (name[0].isalnum() or name[0] == "_"):
        return f"starts with {name[0]!r} (an ASCII first character must be a letter, digit or '_')"
    if name[-1] == " ":
        return "ends with a space"
    normal = unicodedata.normalize("NFC", name)
    if normal != name:
        return f"is not in Unicode NFC form (netCDF would store it as {normal!r})"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long in UTF-8 (at most {MAX_NAME_BYTES})"
    return None


def check_text(what: str, text: object) -> None:
    """Raise unless ``text`` is a string netCDF stores unchanged (no NUL, valid Unicode).

    Raises:
        TypeError: If ``text`` is not a string.
        ValueError: Naming ``what``, the cause and the fix.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} is a {type(text).__name__}; it must be a str.")
    if "\x00" in text:
        raise ValueError(
            f"{what} contains a NUL character ('\\x00'), which netCDF drops silently "
            f"({text[:40]!r} would read back as {text.replace(chr(0), '')[:40]!r}); remove "
            "it, or store json.dumps(...) of it, which escapes it."
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode ({exc.reason} at position {exc.start}), so netCDF "
            "cannot store it; fix the text (it often comes from bytes decoded with "
            "errors='surrogateescape')."
        ) from exc


def check_attrs(attrs: Mapping[str, object], reserved: Collection[str]) -> None:
    """Raise unless netCDF stores every attr unchanged and none takes a ``reserved`` name.

    Values must be ``str`` (without NUL), ``int`` (within int64) or ``float``:
    netCDF has no ``None``, ``bool``, ``dict`` or datetime attrs.

    Raises:
        TypeError: For a value of another type.
        ValueError: For a name or value netCDF would refuse or alter, or a reserved name.
    """
    for key, value in attrs.items():
        check_name("attr", key)
        if key.startswith("_") or key in reserved:
            owner = "the Recorder" if key in reserved else "netCDF (_FillValue, _NCProperties...)"
            raise ValueError(f"attr name {key!r} is reserved for {owner}; rename it.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(
                f"attrs[{key!r}] is a {type(value).__name__}; netCDF attrs must be str, "
                "int or float (store structured values as a JSON string)."
            )
        if isinstance(value, str):
            check_text(f"attrs[{key!r}]", value)
        elif isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError(
                f"attrs[{key!r}] = {value} does not fit netCDF's int64; store it as a str."
            )
