"""Ctrl-C inside a flush, and the completeness marker (``complete`` attr, ``is_complete``).

The random SIGINTs and SIGKILLs of real child processes are in
test_reliability_recording.py; here the ``KeyboardInterrupt`` is injected at
a chosen place inside the append or the publishing copy.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import gradlens.records.atomic
import gradlens.records.netcdf
from gradlens.records import is_complete
from gradlens.records.interrupts import interrupts_held
from gradlens.records.recorder import Recorder, Variable, open_run
from tests.records.test_recording import log_run, make


def interrupt_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, at: int) -> list[int]:
    """Make call number ``at`` of ``owner.name`` raise ``KeyboardInterrupt`` (once)."""
    original: Callable[..., object] = getattr(owner, name)
    calls = [0]

    def interrupted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return calls


def test_the_issue_case_ctrl_c_inside_the_append_writes_no_duplicate_or_nan_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.nc"
    rec = Recorder(path, {"loss": Variable(("step",), "loss")}, flush_every=2)
    rec.log(0, loss=0.0)
    rec.log(1, loss=1.0)  # flush 1: published
    # flush 2 writes the steps 2, 3, then is interrupted before their losses
    interrupt_call(monkeypatch, gradlens.records.netcdf, "block", at=1)
    rec.log(2, loss=2.0)
    with pytest.raises(KeyboardInterrupt):
        rec.log(3, loss=3.0)
    published = open_run(path)
    assert published["step"].values.tolist() == [0, 1]  # the last complete flush
    assert published["loss"].values.tolist() == [0.0, 1.0]
    assert published.attrs["complete"] == 0 and not is_complete(path)
    rec.close()
    ds = open_run(path)
    assert ds["step"].values.tolist() == [0, 1, 2, 3]  # was [0, 1, 2, 3, 2, 3]
    assert ds["loss"].values.tolist() == [0.0, 1.0, 2.0, 3.0]  # was [0, 1, nan, nan, 2, 3]
    assert is_complete(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.nc"]


def expected_run(steps: range) -> xr.Dataset:
    """The in-memory dataset of ``log_run`` over ``steps``, closed as complete."""
    rec = make(None)
    log_run(rec, steps)
    rec.close()
    return rec.dataset()


# log_run over range(12) with flush_every=4 calls block 13 times while flushing; every one
@pytest.mark.parametrize("at", range(1, 14))
def test_ctrl_c_at_any_block_of_an_append_loses_and_repeats_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    path = tmp_path / "run.nc"
    calls = interrupt_call(monkeypatch, gradlens.records.netcdf, "block", at=at)
    rec = make(path, flush_every=4)
    published: list[int] = []
    for step in range(12):
        try:
            log_run(rec, range(step, step + 1))
        except KeyboardInterrupt:
            published = open_run(path)["step"].values.tolist() if path.exists() else []
            assert published == list(range(len(published))) and len(published) % 4 == 0
            assert step - len(published) == 3  # the rows of this flush were held back
    assert calls[0] >= at  # the interruption did happen
    rec.close()
    xr.testing.assert_identical(open_run(path), expected_run(range(12)))


def test_ctrl_c_while_publishing_keeps_the_previous_version_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.nc"
    interrupt_call(monkeypatch, gradlens.records.atomic.shutil, "copyfile", at=2)
    rec = make(path, flush_every=4)
    log_run(rec, range(4))
    with pytest.raises(KeyboardInterrupt):
        log_run(rec, range(4, 8))
    assert open_run(path)["step"].values.tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    log_run(rec, range(8, 12))  # the next flush publishes the rows of both
    assert open_run(path)["step"].values.tolist() == list(range(12))
    rec.close()
    xr.testing.assert_identical(open_run(path), expected_run(range(12)))


def test_ctrl_c_in_a_with_block_keeps_the_rows_once_and_leaves_the_file_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.nc"
    interrupt_call(monkeypatch, gradlens.records.netcdf, "block", at=8)
    with pytest.raises(KeyboardInterrupt), make(path, flush_every=4) as rec:
        log_run(rec, range(12))
    ds = open_run(path)
    steps = ds["step"].values.tolist()
    assert steps == list(range(8))  # interrupted in the flush at step 7: all 8 rows, once
    assert not np.isnan(ds["loss"].values).any()
    xr.testing.assert_identical(ds.drop_attrs(), expected_run(range(len(steps))).drop_attrs())
    assert ds.attrs["complete"] == 0 and not is_complete(path)


def test_every_flush_publishes_incomplete_and_a_clean_close_marks_complete(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.nc"
    rec = make(path, flush_every=2)
    log_run(rec, range(2))
    assert open_run(path).attrs["complete"] == 0 and not is_complete(path)
    log_run(rec, range(2, 5))
    assert rec.dataset().attrs["complete"] == 0 and not is_complete(path)
    rec.close()
    assert open_run(path).attrs["complete"] == 1 and is_complete(path)
    rec.close()  # again: nothing changes
    assert is_complete(path)


def test_a_clean_with_block_is_complete_one_that_raised_is_not(tmp_path: Path) -> None:
    with make(tmp_path / "done.nc") as rec:
        log_run(rec, range(3))
    assert is_complete(tmp_path / "done.nc")
    with pytest.raises(RuntimeError, match="diverged"), make(tmp_path / "raised.nc") as rec:
        log_run(rec, range(3))
        raise RuntimeError("diverged")
    assert open_run(tmp_path / "raised.nc").sizes["step"] == 3  # the rows are kept
    assert not is_complete(tmp_path / "raised.nc")


def test_close_complete_false_marks_a_run_stopped_early(tmp_path: Path) -> None:
    rec = make(tmp_path / "run.nc")
    log_run(rec, range(3))
    rec.close(complete=False)
    assert open_run(tmp_path / "run.nc").sizes["step"] == 3
    assert not is_complete(tmp_path / "run.nc")
    in_memory = make(None)
    assert in_memory.dataset().attrs["complete"] == 0
    in_memory.close(complete=False)
    assert in_memory.dataset().attrs["complete"] == 0


def test_is_complete_is_false_for_missing_foreign_older_and_damaged_files(
    tmp_path: Path,
) -> None:
    assert not is_complete(tmp_path / "missing.nc")
    xr.Dataset({"x": ("step", [1.0])}).to_netcdf(tmp_path / "older.nc")  # no marker
    assert not is_complete(tmp_path / "older.nc")
    xr.Dataset(attrs={"complete": "1"}).to_netcdf(tmp_path / "text.nc")  # a str, not 1
    assert not is_complete(tmp_path / "text.nc")
    (tmp_path / "junk.nc").write_text("not netCDF")
    assert not is_complete(tmp_path / "junk.nc")
    with make(tmp_path / "run.nc") as rec:
        log_run(rec, range(3))
    data = (tmp_path / "run.nc").read_bytes()
    (tmp_path / "cut.nc").write_bytes(data[: len(data) // 3])  # written straight, then killed
    assert is_complete(tmp_path / "run.nc") and not is_complete(tmp_path / "cut.nc")
    assert not is_complete(tmp_path)  # a folder


def test_is_complete_raises_for_a_file_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreadable is not "not complete": the caller must not rerun over a finished run."""
    with make(tmp_path / "run.nc") as rec:
        log_run(rec, range(1))

    def refuse(*args: object, **kwargs: object) -> None:  # root reads any file: inject it
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "run.nc"))

    monkeypatch.setattr(gradlens.records.netcdf.netCDF4, "Dataset", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        is_complete(tmp_path / "run.nc")


def test_a_file_in_progress_is_not_complete_to_a_reader(tmp_path: Path) -> None:
    """What a sweep runner sees polling a live run: incomplete until the end."""
    path = tmp_path / "run.nc"
    seen = []
    with make(path, flush_every=3) as rec:
        for step in range(9):
            log_run(rec, range(step, step + 1))
            seen.append(is_complete(path))
    assert not any(seen) and is_complete(path)


def test_a_real_ctrl_c_inside_a_netcdf_write_is_held_until_the_file_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGINT sent from inside the write (the 5th block) does not stop it half-way.

    netCDF4-python's bare ``except:`` clauses could swallow or recast an interruption
    raised in its code, so the recorder holds SIGINT while netCDF4 runs: the flush
    finishes, the file closes, and then ``KeyboardInterrupt`` is raised, before the
    rows count as written, so the next flush writes them again at the same positions.
    """
    original = gradlens.records.netcdf.block
    calls, inside = [0], []

    def signalled(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            inside.append(True)  # reached: the handler raised nothing here
        return original(*args, **kwargs)

    monkeypatch.setattr(gradlens.records.netcdf, "block", signalled)
    # Python's own handler: a test run started in the background (`cmd &`) has SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    rec = make(path := tmp_path / "run.nc", flush_every=4)
    interrupted = []
    try:
        for step in range(8):
            try:
                log_run(rec, range(step, step + 1))
            except KeyboardInterrupt:
                interrupted.append(step)
        held = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted == [3]  # raised by the first flush, once it was over
    assert inside == [True] and calls[0] > 5  # the write went on past the signal
    assert held is signal.default_int_handler  # restored after each write
    rec.close()
    xr.testing.assert_identical(open_run(path), expected_run(range(8)))


def test_held_interrupts_run_the_original_handler_once_after_the_block() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]  # once, however many presses
        with interrupts_held():  # nothing pressed: nothing run
            pass
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_held_interrupts_leave_an_ignored_sigint_and_other_threads_alone() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_held():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    errors: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            with interrupts_held():  # signal.signal would raise ValueError here
                pass
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert errors == []
