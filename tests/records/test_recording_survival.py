"""What a recorded run survives: a reader beside the writer, a failed write (issue 10).

The SIGKILL test is in test_recording.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import gradlens.records.atomic
import gradlens.records.files
import gradlens.records.netcdf
import gradlens.records.recorder
from gradlens.errors import RecordWriteError
from gradlens.records.atomic import scratch_path
from gradlens.records.recorder import open_run
from tests.records.test_recording import log_run, make

TESTS = str(Path(__file__).parent)

WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_recording import log_run, make
with make({path!r}, flush_every=3) as rec:
    for step in range({steps}):
        log_run(rec, range(step, step + 1))
        time.sleep(0.01)
"""

READER = """
import json, os, sys, time
import numpy as np
import xarray as xr
from gradlens.records.atomic import scratch_path
from gradlens.records.recorder import open_run

path = {path!r}
deadline = time.monotonic() + 30
while not os.path.exists(path) and time.monotonic() < deadline:
    time.sleep(0.005)
seen, held = [], []
while time.monotonic() < deadline:
    done = os.path.exists({done!r})
    ds = open_run(path)
    seen.append([ds["step"].values.tolist(), ds["loss"].values.tolist(),
                 ds["example_step"].values.tolist()])
    if len(seen) % 5 == 1:  # hold plain xarray handles open across later polls
        held.append(xr.open_dataset(path))
    if len(held) > 3:
        old = held.pop(0)
        seen.append([old["step"].values.tolist(), old["loss"].values.tolist(),
                     old["example_step"].values.tolist()])
        old.close()
    if done:
        break
    time.sleep(0.02)
print(json.dumps(seen))
"""


def test_a_polling_reader_in_another_process_does_not_harm_the_writer(tmp_path: Path) -> None:
    path, done, steps = tmp_path / "run.nc", tmp_path / "done", 150
    code = {"tests": TESTS, "path": str(path), "done": str(done), "steps": steps}
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(READER.format(**code))],
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WRITER.format(**code))],
        capture_output=True,
        text=True,
        check=False,
    )
    done.touch()
    out, _ = reader.communicate(timeout=60)
    assert writer.returncode == 0, writer.stderr
    assert reader.returncode == 0

    final = open_run(path)
    assert final["step"].values.tolist() == list(range(steps))
    reads = json.loads(out)
    assert len(reads) > 10
    sizes = []
    for step, loss, example_step in reads:
        n = len(step)
        assert step == list(range(n))  # a complete prefix, strictly increasing
        np.testing.assert_allclose(loss, 1.0 / (np.arange(n) + 1.0), rtol=1e-6)
        assert example_step == list(range(0, n, 3))
        sizes.append(n)
    assert max(sizes) >= steps - 3


def open_files_under(folder: Path) -> list[str]:
    """Paths under ``folder`` that this process holds open (Linux; empty elsewhere)."""
    fds = Path("/proc/self/fd")
    names = []
    for fd in fds.iterdir() if fds.is_dir() else ():
        try:
            names.append(os.readlink(fd))
        except OSError:
            continue
    return [n for n in names if n.startswith(str(folder))]


def full_disk_from_flush(monkeypatch: pytest.MonkeyPatch, flush: int, where: str) -> None:
    """Make flush number ``flush`` and later raise ``OSError(ENOSPC)`` while appending
    (inside the open netCDF file) or while publishing (copying the working file)."""
    flushes = [0]
    append, block, copy = (
        gradlens.records.recorder.append_netcdf,
        gradlens.records.netcdf.block,
        gradlens.records.atomic.shutil.copyfile,
    )

    def counted_append(*args: object, **kwargs: object) -> None:
        flushes[0] += 1
        append(*args, **kwargs)

    def full(original: Callable[..., object], stage: str) -> Callable[..., object]:
        def write(*args: object) -> object:
            if where == stage and flushes[0] >= flush:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(*args)

        return write

    monkeypatch.setattr(gradlens.records.recorder, "append_netcdf", counted_append)
    monkeypatch.setattr(gradlens.records.netcdf, "block", full(block, "append"))
    monkeypatch.setattr(gradlens.records.atomic.shutil, "copyfile", full(copy, "publish"))


@pytest.mark.parametrize("where", ["append", "publish"])
def test_a_full_disk_names_the_file_keeps_the_flushed_steps_and_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    full_disk_from_flush(monkeypatch, 3, where)
    path = tmp_path / "run.nc"
    rec = make(path, flush_every=5)
    with pytest.raises(RecordWriteError, match="No space left on device") as caught:
        log_run(rec, range(30))
    message = str(caught.value)
    assert "rows of step 10..14" in message and str(path) in message
    assert f"{path} still holds every row up to the previous flush" in message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    with pytest.raises(ValueError, match="closed"):
        rec.log(30, loss=1.0, n_correct=1, epoch=0)
    rec.close()  # nothing is retried
    rec.flush()  # nor written over the kept file
    assert rec.dataset()["step"].values.tolist() == list(range(10))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.nc"]
    assert open_files_under(tmp_path) == []
    survived = open_run(path)
    assert survived["step"].values.tolist() == list(range(10))
    assert not np.isnan(survived["loss"].values).any()


def test_a_finished_run_leaves_only_its_file_and_clears_a_killed_ones(tmp_path: Path) -> None:
    path = tmp_path / "run.nc"
    (tmp_path / "run.nc.writing").write_text("left by a killed recorder")
    with make(path, flush_every=4) as rec:
        log_run(rec, range(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.nc"]
    assert open_files_under(tmp_path) == []


def test_a_recorder_in_a_missing_folder_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"folder .*missing of run.nc does not exist; create it"
    ):
        make(tmp_path / "missing" / "run.nc")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_run_is_flushed_every_flush_seconds_however_few_rows(tmp_path: Path) -> None:
    clock, path = FakeClock(), tmp_path / "run.nc"
    rec = make(path, flush_every=1000, flush_seconds=30.0, clock=clock)
    log_run(rec, range(0, 2))
    clock.now += 29.9
    log_run(rec, range(2, 3))
    assert not path.exists()  # 29.9 s and 3 rows: nothing due yet
    clock.now += 0.1
    log_run(rec, range(3, 4))  # 30 s after construction: flushed at this log
    assert open_run(path)["step"].values.tolist() == [0, 1, 2, 3]
    clock.now += 20.0
    log_run(rec, range(4, 6))
    assert open_run(path).sizes["step"] == 4  # 20 s after the last flush
    clock.now += 10.0
    log_run(rec, range(6, 7))
    assert open_run(path)["step"].values.tolist() == list(range(7))
    rec.close()


def test_flush_seconds_none_flushes_on_rows_alone(tmp_path: Path) -> None:
    clock, path = FakeClock(), tmp_path / "run.nc"
    rec = make(path, flush_every=5, flush_seconds=None, clock=clock)
    clock.now += 1e6
    log_run(rec, range(4))
    assert not path.exists()
    log_run(rec, range(4, 5))
    assert open_run(path).sizes["step"] == 5
    rec.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flush_seconds": 0.0}, "flush_seconds must be a positive number of seconds or None"),
        ({"flush_seconds": -5}, "flush_seconds must be a positive number of seconds or None"),
        ({"flush_every": 0}, "flush_every must be at least 1 row"),
    ],
)
def test_flush_settings_are_checked(tmp_path: Path, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(tmp_path / "run.nc", **kwargs)


def test_a_recorder_on_a_folder_or_in_an_unwritable_one_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(IsADirectoryError, match=r"is a folder; give the Recorder a file in it"):
        make(tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with monkeypatch.context() as patch:  # root may write anywhere: inject the refusal
        patch.setattr(gradlens.records.files.tempfile, "TemporaryFile", refuse)
        with pytest.raises(
            PermissionError, match=r"cannot create files in .* \(Permission denied\); choose"
        ):
            make(tmp_path / "run.nc")
    if os.geteuid() == 0:
        return  # below, a real read-only folder, which root can write anyway
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match=r"cannot create files in .*locked"):
        make(locked / "run.nc")
    assert list(locked.iterdir()) == []


def test_a_netcdf_library_failure_is_a_record_write_error_without_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.nc"
    rec = make(path, flush_every=5)
    log_run(rec, range(5))

    def hdf_error(*args: object, **kwargs: object) -> None:
        raise RuntimeError("NetCDF: HDF error")

    monkeypatch.setattr(gradlens.records.recorder, "append_netcdf", hdf_error)
    with pytest.raises(RecordWriteError, match=r"NetCDF: HDF error\). .* MiB free there") as e:
        log_run(rec, range(5, 10))
    assert e.value.errno is None
    assert e.value.filename == str(scratch_path(path, ".writing"))
    assert open_run(path)["step"].values.tolist() == list(range(5))
