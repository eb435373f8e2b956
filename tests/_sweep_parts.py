"""Trivial sweep parts, in a module of their own so that a part imports neither torch nor gradlens.

(The job's wrapper, gradlens.sweeps.run_part_job, imports gradlens.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import xarray as xr


def _dataset(arg: dict, *, complete: int) -> xr.Dataset:
    return xr.Dataset(
        {"value": ("step", np.array([arg["seed"] * 10.0]))},
        coords={"step": [0]},
        attrs={
            "config": json.dumps(arg["config"], sort_keys=True),
            "complete": complete,
            **arg.get("version", {}),
        },
    )


def write_part(arg: dict) -> None:
    """Write ``arg["path"]``: ``value = seed * 10``, the config and ``arg["version"]`` (attrs).

    Every call appends the seed to ``arg["log"]``, so a test can count the runs. With
    ``arg["sleep"]`` seconds, it first writes the file at its path unmarked (as a Recorder's
    flushes do), then sleeps, then replaces it by the complete file; with ``arg["fail"]``
    it raises instead.
    """
    path = Path(arg["path"])
    if arg.get("fail"):
        raise ValueError(f"part {arg['seed']} was told to fail")
    with open(arg["log"], "a") as log:
        log.write(f"{arg['seed']}\n")
    partial = path.with_name(path.name + ".part")
    if arg.get("sleep"):  # published whole, as a Recorder's flushes are: a kill cannot cut it
        _dataset(arg, complete=0).to_netcdf(partial, engine="netcdf4")
        os.replace(partial, path)
        time.sleep(arg["sleep"])
    _dataset(arg, complete=1).to_netcdf(partial, engine="netcdf4")
    os.replace(partial, path)


def forget_to_write(arg: dict) -> None:
    """A part that returns without writing its file."""
    del arg
