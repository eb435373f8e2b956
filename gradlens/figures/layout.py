"""Checks and small pieces shared by the figures of :mod:`gradlens.figures.plots` (private)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import xarray as xr
from matplotlib.axes import Axes

__all__ = ["check_layout", "check_rest", "groups_of", "label_of", "row_label", "units_of"]


def check_layout(
    ds: xr.Dataset, var: str, dims: Sequence[str] = (), *, who: str = "plot"
) -> xr.DataArray:
    """The variable ``var`` of ``ds``, after checking that it has every dim in ``dims``.

    Args:
        ds: A run's Dataset.
        var: The variable a figure draws.
        dims: Dims the figure needs ``var`` to have.
        who: The caller's name, for the message.

    Returns:
        ``ds[var]``.

    Raises:
        TypeError: ``ds`` is not an :class:`xarray.Dataset`.
        ValueError: ``var`` is missing, or lacks one of ``dims``; the message
            names what is missing and what the dataset has.
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"{who}: expected an xarray.Dataset, got {type(ds).__name__}.")
    if var not in ds.data_vars:
        raise ValueError(
            f"{who}: the dataset has no variable {var!r}; it has {sorted(map(str, ds.data_vars))}."
        )
    da = ds[var]
    missing = [d for d in dims if d not in da.dims]
    if missing:
        hint = (
            "Record it with dims ('step', ...), or rename yours with ds.rename(...)."
            if "step" in missing
            else "Pass a dim it has, or add one by concatenating runs along it "
            f"(xr.concat(runs, dim={missing[0]!r}))."
        )
        raise ValueError(
            f"{who} needs a {' and a '.join(map(repr, missing))} dim, but {var!r} has dims "
            f"{tuple(map(str, da.dims))}. {hint}"
        )
    return da


def check_rest(da: xr.DataArray, used: Sequence[Hashable | None], who: str, spread: str) -> None:
    """Raise if ``da`` has dims that no axis, panel or colour of the figure uses."""
    rest = [str(d) for d in da.dims if d not in used]
    if rest:
        raise ValueError(
            f"{who}: {da.name!r} has dims {rest} that this figure has no place for; spread one "
            f"with {spread}=, or select or average it first (ds.sel({rest[0]}=...) or "
            f"ds.mean({rest[0]!r}))."
        )


def groups_of(da: xr.DataArray, dim: str | None) -> list[tuple[str | None, xr.DataArray]]:
    """``(label, slice)`` per value of ``dim``; one unlabelled slice without it."""
    if dim is None:
        return [(None, da)]
    return [(str(v), da.isel({dim: i})) for i, v in enumerate(da[dim].values)]


def label_of(da: xr.DataArray) -> str:
    """The variable's ``long_name`` (else its name) with its units: ``"loss [nat]"``.

    Units ``"1"`` read ``[dimensionless]``; a variable without a ``units`` attr
    gets no bracket.
    """
    name = str(da.attrs.get("long_name", da.name))
    return f"{name} [{units_of(da)}]" if "units" in da.attrs else name


def units_of(da: xr.DataArray) -> str:
    """The ``units`` attr as a figure shows it: ``"1"`` is ``"dimensionless"``; ``""`` if none."""
    units = str(da.attrs.get("units", ""))
    return "dimensionless" if units == "1" else units


def row_label(ax: Axes, label: str | None) -> None:
    """Label a panel row on its left, horizontally."""
    if label is not None:
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
