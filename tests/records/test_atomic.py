"""Results files are replaced whole or not at all, even by a killed process; their mode
follows the umask; the temporary files of dead writers are removed, of live ones kept."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xarray as xr

from gradlens.records.atomic import (
    atomic_copy,
    atomic_write,
    atomic_write_text,
    remove_stale,
    scratch_path,
)

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


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test, restoring it afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask) and None
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(
    tmp_path: Path, umask: Callable[[int], None], mask: int, mode: int
) -> None:
    """Not tempfile's 0o600: other accounts sharing a results folder can read them."""
    umask(mask)
    atomic_write_text(tmp_path / "summary.md", "v1")
    atomic_write(tmp_path / "table.nc", lambda tmp: xr.Dataset({"x": ("a", [1.0])}).to_netcdf(tmp))
    atomic_copy(tmp_path / "summary.md", tmp_path / "copy.md")
    with open(tmp_path / "plain.md", "w") as file:  # what they must match
        file.write("v1")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["summary.md", "table.nc", "copy.md", "plain.md"], mode)


def dead_pid() -> int:
    """The pid of a process that has exited (and been waited for)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


@pytest.mark.skipif(os.name == "nt", reason="processes are not probed on Windows")
def test_the_next_write_removes_temporary_files_of_dead_processes_only(tmp_path: Path) -> None:
    path = tmp_path / "summary.md"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = scratch_path(path, "").name.removeprefix("summary.md.").split("-")[0]
        other_host = "0" * 8 if host != "0" * 8 else "1" * 8
        dead = tmp_path / f".summary.md.{host}-{dead_pid()}.0123abcd.tmp"
        kept = [
            tmp_path / f".summary.md.{host}-{live.pid}.0123abcd.tmp",  # a live writer's
            tmp_path / f".summary.md.{other_host}-{dead_pid()}.0123abcd.tmp",  # another host's
            tmp_path / f".other.md.{host}-{dead_pid()}.0123abcd.tmp",  # another name's
            tmp_path / ".summary.md.k2j4h5g6.tmp",  # the pid-less name of older versions
            tmp_path / f"summary.md.{host}-{dead_pid()}.txt",  # another suffix
        ]
        for file in [dead, *kept]:
            file.write_text("left over")
        atomic_write_text(path, "v2")
        assert sorted(tmp_path.iterdir()) == sorted([path, *kept])
        assert remove_stale(tmp_path / "other.md", ".tmp") == [kept[2]]
    finally:
        live.kill()
        live.wait()
