"""The files around a recorder's path: their mode, the debris of dead writers, the handle of
a failed write, and what a failed write's error says."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import netCDF4
import pytest

import gradlens.records.files
import gradlens.records.netcdf
import gradlens.records.recorder
from gradlens.errors import RecordWriteError
from gradlens.records.atomic import scratch_path
from gradlens.records.recorder import open_run
from tests.records.test_recording import log_run, make
from tests.records.test_recording_survival import open_files_under


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_recorded_file_gets_the_mode_open_would_give(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "run.nc"
    rec = make(path, flush_every=2)
    log_run(rec, range(2))
    assert mode(path) == 0o644  # a published copy (was 0o600, tempfile's)
    log_run(rec, range(2, 5))
    rec.close()
    assert mode(path) == 0o644  # the working file renamed into place
    os.umask(0o077)
    with make(tmp_path / "private.nc") as rec:
        log_run(rec, range(1))
    assert mode(tmp_path / "private.nc") == 0o600  # follows the umask, not a constant


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
def test_the_next_recorder_removes_what_dead_writers_of_its_path_left_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.nc"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = scratch_path(path, ".writing")  # this process's names, to derive the others
        host_pid = mine.name.removeprefix("run.nc.").removesuffix(".writing")
        dead = host_pid.replace(f"-{os.getpid()}", f"-{dead_pid()}")
        alive = host_pid.replace(f"-{os.getpid()}", f"-{live.pid}")
        stale = [
            tmp_path / f"run.nc.{dead}.writing",  # a killed recorder's working file
            tmp_path / f".run.nc.{dead}.0a1b2c3d4e5f6a7b.tmp",  # killed while publishing
            tmp_path / "run.nc.writing",  # the pid-less working file of gradlens 0.2.0
        ]
        kept = [
            tmp_path / f"run.nc.{alive}.writing",  # a live writer's (one recorder per path)
            tmp_path / f".run.nc.{alive}.0a1b2c3d4e5f6a7b.tmp",
            tmp_path / f".other.nc.{dead}.0a1b2c3d4e5f6a7b.tmp",  # another file's
        ]
        for file in stale + kept:
            file.write_bytes(b"\0" * 4096)
        with make(path, flush_every=2) as rec:
            assert sorted(tmp_path.iterdir()) == sorted(kept)
            log_run(rec, range(5))
        assert sorted(tmp_path.iterdir()) == sorted([path, *kept])
    finally:
        live.kill()
        live.wait()


def test_a_close_that_fails_on_a_full_disk_still_releases_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """netCDF keeps a file open when its close cannot write (full disk): a deleted working
    file then kept its space. The writer empties it and closes it again."""
    sizes_at_second_close = []

    class FullDisk(netCDF4.Dataset):  # type: ignore[misc]
        def close(self) -> None:
            if not sizes_at_second_close:
                sizes_at_second_close.append(-1)
                raise RuntimeError("NetCDF: HDF error")
            sizes_at_second_close.append(os.path.getsize(self.filepath()))
            super().close()

    path = tmp_path / "run.nc"
    rec = make(path, flush_every=4)
    log_run(rec, range(4))
    monkeypatch.setattr(gradlens.records.netcdf, "netCDF4", SimpleNamespace(Dataset=FullDisk))
    with pytest.raises(RecordWriteError, match=r"NetCDF: HDF error\). .* MiB free there"):
        log_run(rec, range(4, 8))
    assert sizes_at_second_close == [-1, 0]  # emptied before the second close
    assert open_files_under(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.nc"]
    assert open_run(path)["step"].values.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("cause", "free_mib", "likely"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 5000, "is likely full"),
        (RuntimeError("NetCDF: HDF error"), 1, "is likely full"),
        (RuntimeError("enforce fail at inline_container.cc:603"), 1, "is likely full"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), 1, "is likely full"),
        (RuntimeError("NetCDF: HDF error"), 5000, "the disk is not full, so the likely cause"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), 5000, "no longer writable"),
    ],
)
def test_a_failed_write_names_the_free_space_the_likely_cause_and_what_is_kept(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cause: Exception,
    free_mib: int,
    likely: str,
) -> None:
    path = tmp_path / "run.nc"
    rec = make(path, flush_every=5)
    log_run(rec, range(5))

    def fail(*args: object, **kwargs: object) -> None:
        raise cause

    usage = SimpleNamespace(total=10**12, used=0, free=free_mib * 2**20)
    monkeypatch.setattr(gradlens.records.recorder, "append_netcdf", fail)
    monkeypatch.setattr(gradlens.records.files.shutil, "disk_usage", lambda _: usage)
    with pytest.raises(RecordWriteError) as caught:
        log_run(rec, range(5, 10))
    message = str(caught.value)
    assert f"{free_mib:.1f} MiB free there" in message and likely in message, message
    assert str(cause) in message and "rows of step 5..9" in message
    assert f"{path} still holds every row up to the previous flush and is kept" in message
    assert open_run(path)["step"].values.tolist() == list(range(5))
