"""Results files are replaced whole or not at all, even by a killed process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xarray as xr

from gradlens.records.atomic import atomic_write

KILLED_WHILE_WRITING = """
import os, signal
import numpy as np, xarray as xr
from gradlens.records.atomic import atomic_write

def write(tmp):
    xr.Dataset({{"x": ("step", np.arange(100_000.0))}}).to_netcdf(tmp)
    os.kill(os.getpid(), signal.SIGKILL)  # the moment the old file became a 48-byte stub

atomic_write({path!r}, write)
"""


def test_a_writer_killed_mid_write_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "mnist_aux.nc"
    xr.Dataset({"x": ("step", [1.0, 2.0])}).to_netcdf(path)
    code = textwrap.dedent(KILLED_WHILE_WRITING.format(path=str(path)))
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    assert xr.load_dataset(path)["x"].values.tolist() == [1.0, 2.0]


def test_a_failed_write_leaves_the_previous_version_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.md"
    path.write_text("v1")

    def fail(tmp: Path) -> None:
        tmp.write_text("half of v2")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fail)
    assert path.read_text() == "v1" and [p.name for p in tmp_path.iterdir()] == ["summary.md"]
