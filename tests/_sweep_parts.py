"""Trivial sweep parts, in a module of their own so a job imports neither torch nor gradlens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xarray as xr


def write_part(arg: dict) -> None:
    """Write ``arg["path"]``: ``value = seed * 10`` and the config, renamed into place at the end.

    Every call appends the seed to ``arg["log"]``, so a test can count the runs.
    """
    path = Path(arg["path"])
    if arg.get("fail"):
        raise ValueError(f"part {arg['seed']} was told to fail")
    with open(arg["log"], "a") as log:
        log.write(f"{arg['seed']}\n")
    ds = xr.Dataset(
        {"value": ("step", np.array([arg["seed"] * 10.0]))},
        coords={"step": [0]},
        attrs={"config": json.dumps(arg["config"], sort_keys=True)},
    )
    partial = path.with_name(path.name + ".part")
    ds.to_netcdf(partial, engine="netcdf4")
    os.replace(partial, path)


def forget_to_write(arg: dict) -> None:
    """A part that returns without writing its file."""
    del arg
