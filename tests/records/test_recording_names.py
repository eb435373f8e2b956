"""Names, labels and attrs netCDF would refuse or alter are refused when the Recorder is made,
not at its first flush in the middle of a run."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import netCDF4
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

from gradlens.records.recorder import Recorder, Variable, open_run
from gradlens.records.schema import check_name

LOSS = {"loss": Variable(("step",), "loss")}

BAD: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "slash in a variable": (
        {"variables": {"train/loss": Variable(("step",), "loss")}},
        ValueError,
        r"variable name 'train/loss' contains '/', which netCDF takes as a group path .* "
        r"rename it",
    ),
    "slash in a dim": (
        {"variables": {"loss": Variable(("train/step",), "loss")}},
        ValueError,
        r"dim name 'train/step' contains '/'",
    ),
    "NUL in a variable": (
        {"variables": {"lo\0ss": Variable(("step",), "loss")}},
        ValueError,
        r"variable name 'lo\\x00ss' contains the control character '\\x00'",
    ),
    "tab in a dim": (
        {"variables": {"loss": Variable(("step", "la\tyer"), "loss")}},
        ValueError,
        r"dim name 'la\\tyer' contains the control character '\\t'",
    ),
    "empty": ({"variables": {"": Variable(("step",), "loss")}}, ValueError, "is empty"),
    "leading dash": (
        {"variables": {"-loss": Variable(("step",), "loss")}},
        ValueError,
        r"starts with '-' \(an ASCII first character must be a letter, digit or '_'\)",
    ),
    "trailing space": (
        {"variables": {"loss ": Variable(("step",), "loss")}},
        ValueError,
        "ends with a space",
    ),
    "not NFC": (
        {"variables": {"e\u0301": Variable(("step",), "loss")}},
        ValueError,
        "is not in Unicode NFC form \\(netCDF would store it as '\u00e9'\\)",
    ),
    "too long": (
        {"variables": {"x" * 256: Variable(("step",), "loss")}},
        ValueError,
        r"is 256 bytes long in UTF-8 \(at most 255\)",
    ),
    "space in a coordinate variable": (
        {
            "variables": {
                "loss": Variable(("step",), "loss"),
                "my epoch": Variable(("step",), "epoch", dtype="int64", coord=True),
            }
        },
        ValueError,
        r"coordinate variable 'my epoch' has whitespace .* read back as a data variable",
    ),
    "NUL in long_name": (
        {"variables": {"loss": Variable(("step",), "lo\0ss")}},
        ValueError,
        r"variables\['loss'\].long_name contains a NUL character .* \('lo\\x00ss' would read "
        r"back as 'loss'\); remove it",
    ),
    "NUL in a label": (
        {"coords": {"layer": ["net.0", "net.2\0"]}},  # numpy alone would drop it silently
        ValueError,
        r"coords\['layer'\] label contains a NUL character",
    ),
    "NUL in an attr": (
        {"attrs": {"note": "a\0b"}},
        ValueError,
        r"attrs\['note'\] contains a NUL character \('\\x00'\), which netCDF drops silently",
    ),
    "lone surrogate in an attr": (
        {"attrs": {"note": "a\udc80"}},
        ValueError,
        r"attrs\['note'\] is not valid Unicode .*surrogateescape",
    ),
    "None attr": ({"attrs": {"note": None}}, TypeError, r"attrs\['note'\] is a NoneType"),
    "bool attr": ({"attrs": {"debug": True}}, TypeError, r"attrs\['debug'\] is a bool"),
    "dict attr": ({"attrs": {"opt": {"lr": 1}}}, TypeError, r"is a dict; .* JSON string"),
    "huge int attr": (
        {"attrs": {"seed": 2**64}},
        ValueError,
        r"attrs\['seed'\] = 18446744073709551616 does not fit netCDF's int64; store it as a str",
    ),
    "slash in an attr name": (
        {"attrs": {"opt/lr": 0.1}},
        ValueError,
        r"attr name 'opt/lr' contains '/'",
    ),
    "netCDF's attr name": (
        {"attrs": {"_FillValue": 0.0}},
        ValueError,
        r"attr name '_FillValue' is reserved for netCDF",
    ),
    "the coordinates attr": (
        {"attrs": {"coordinates": "epoch"}},
        ValueError,
        r"attr name 'coordinates' is reserved for the Recorder",
    ),
    "the completeness marker": (
        {"attrs": {"complete": 1}},
        ValueError,
        r"attr name 'complete' is reserved for the Recorder",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_name_or_attr_netcdf_cannot_store_is_refused_at_construction(
    tmp_path: Path, case: str
) -> None:
    kwargs, error, match = BAD[case]
    kwargs = {"variables": {**LOSS, "g": Variable(("step", "layer"), "g")}} | kwargs
    with pytest.raises(error, match=match):
        Recorder(tmp_path / "run.nc", **kwargs)
    with pytest.raises(error, match=match):
        Recorder(None, **kwargs)  # in memory too, so that a file of the same run works
    assert list(tmp_path.iterdir()) == []


def test_names_netcdf_can_store_round_trip(tmp_path: Path) -> None:
    """The rules refuse no more than they must: these all work, and read back as written."""
    names = ["a b", "_x", "1x", "x.y", "x-y", "x:y", "λ", "\u00e9", "x\u00a0", "é" * 127]
    variables = {name: Variable(("step", "d" + str(i)), "v") for i, name in enumerate(names)}
    variables["epoch.n"] = Variable(("step",), "epoch", dtype="int64", coord=True)
    path = tmp_path / "run.nc"
    with Recorder(path, variables, attrs={"a b": "x\ty", "λ": "é\n"}) as rec:
        rec.log(0, **{n: [1.0] for n in names}, **{"epoch.n": 0})
    ds = open_run(path)
    assert set(names) <= set(ds.data_vars) and "epoch.n" in ds.coords
    assert ds.attrs["a b"] == "x\ty" and ds.attrs["λ"] == "é\n"


def netcdf_keeps(name: str, folder: Path) -> bool:
    """Whether netCDF4 writes ``name`` as a variable and attr name and reads it back."""
    path = folder / "probe.nc"
    path.unlink(missing_ok=True)
    try:
        with netCDF4.Dataset(path, "w") as nc:
            nc.createDimension("step", 1)
            nc.createVariable(name, "f4", ("step",))[:] = [1.0]
            nc.setncattr(name, "v")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.load_dataset(path)
    except (OSError, RuntimeError, AttributeError, UnicodeError, ValueError):
        return False
    return name in ds.variables and ds.attrs.get(name) == "v"


TRICKY = [" ", "/", "\0", "\t", "\n", "-", ".", "@", "~", '"', "_", "\x7f", "\u0301", "\u00a0"]


@given(
    st.text(
        alphabet=st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8")),
        max_size=6,
    )
)
def test_check_name_refuses_exactly_what_netcdf_refuses_or_alters(name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        keeps = netcdf_keeps(name, Path(folder))
    try:
        check_name("variable", name)
    except ValueError:
        assert not keeps, f"{name!r} was refused, but netCDF keeps it"
    else:
        assert keeps, f"{name!r} was accepted, but netCDF refuses or alters it"
