"""gradlens.sweeps on submitit's local executor: parts run, failures surface, resubmission skips
what is done or running, a killed driver's jobs are found, a killed part is run again."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from gradlens import open_run
from gradlens.sweeps import (
    Part,
    PartLockedError,
    code_version,
    hold_parts,
    is_complete,
    lock_path,
    make_executor,
    part_state,
    pending_parts,
    read_lock,
    run_sweep,
    stored_config,
    wait_for_parts,
)
from tests._sweep_parts import forget_to_write, write_part

ROOT = Path(__file__).resolve().parents[1]
IGNORE = {"out"}  # a field that says where the sweep goes, not what a part holds
VERSION = code_version()._asdict()


def sweep(
    folder: Path,
    *,
    lr: float = 0.1,
    fail: int | None = None,
    sleep: float = 0.0,
    seeds: int = 3,
    version: dict[str, str] | None = None,
) -> list[Part]:
    log = folder / "runs.log"
    parts = []
    for seed in range(seeds):
        config = {"seed": seed, "lr": lr, "out": str(folder)}
        path = folder / f"seed{seed}.nc"
        arg = {"path": str(path), "seed": seed, "log": str(log), "config": config}
        arg |= {"fail": seed == fail, "sleep": sleep, "version": version or VERSION}
        parts.append(Part(path, write_part, arg, config))
    return parts


def runs(folder: Path) -> list[int]:
    log = folder / "runs.log"
    return [int(s) for s in log.read_text().split()] if log.exists() else []


def paths(folder: Path, seeds: int = 3) -> set[Path]:
    return {folder / f"seed{s}.nc" for s in range(seeds)}


def all_done(folder: Path, seeds: int = 3) -> bool:
    locks = list(folder.glob("*.lock"))
    return not locks and all(is_complete(p) for p in paths(folder, seeds))


@pytest.fixture
def executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    # The jobs are fresh interpreters: they find tests._sweep_parts through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return make_executor(tmp_path / "jobs", cluster="local", timeout_min=5)


def until(found: object, seconds: float = 60.0) -> None:
    """Wait until ``found()`` is true."""
    end = time.monotonic() + seconds
    while not found():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def started(folder: Path, seeds: int) -> bool:
    """Every part's job has recorded its process in the lock, and begun writing."""
    locks = [read_lock(p) for p in paths(folder, seeds)]
    ok = all(lock and lock.record and lock.record["job"] for lock in locks)
    return ok and all(p.exists() for p in paths(folder, seeds))


def test_local_sweep_reports_a_failed_part_and_a_resubmission_runs_only_what_is_missing(
    tmp_path: Path, executor: object
) -> None:
    with pytest.raises(
        RuntimeError, match=r"(?s)1 of 3 parts did not finish:\n.*seed2\.nc.*told to fail"
    ):
        run_sweep(sweep(tmp_path, fail=2), executor)
    assert sorted(runs(tmp_path)) == [0, 1]
    assert not (tmp_path / "seed2.nc").exists() and not list(tmp_path.glob("*.lock"))

    again = run_sweep(sweep(tmp_path), executor)
    assert again.submitted == (tmp_path / "seed2.nc",)
    assert again.skipped == (tmp_path / "seed0.nc", tmp_path / "seed1.nc")
    assert sorted(runs(tmp_path)) == [0, 1, 2]  # parts 0 and 1 did not run twice

    merged = xr.concat(
        [open_run(p).expand_dims(seed=[s]) for s, p in enumerate(again.skipped + again.submitted)],
        dim="seed",
    )
    assert merged["value"].sel(step=0).values.tolist() == [0.0, 10.0, 20.0]
    assert run_sweep(sweep(tmp_path), executor).submitted == ()


def test_a_resubmission_while_parts_run_submits_nothing_and_waits_for_them(
    tmp_path: Path, executor: object
) -> None:
    first = run_sweep(sweep(tmp_path, sleep=1.5, seeds=2), executor, wait=False)
    assert set(first.submitted) == paths(tmp_path, 2)
    lock = read_lock(tmp_path / "seed0.nc")
    assert lock is not None and lock.state == "running"
    assert f"local job {first.jobs[0].job_id}" in lock.holder
    again = run_sweep(sweep(tmp_path, sleep=1.5, seeds=2), executor, wait=False)
    assert again.submitted == () and set(again.running) == paths(tmp_path, 2)
    waited = run_sweep(sweep(tmp_path, sleep=1.5, seeds=2), executor)
    assert waited.submitted == () and set(waited.running) == paths(tmp_path, 2)
    assert sorted(runs(tmp_path)) == [0, 1]  # one job per part, never two on one file
    assert all_done(tmp_path, 2)
    assert [job.result() for job in first.jobs] == [None, None]
    assert run_sweep(sweep(tmp_path, seeds=2), executor) == (
        (tmp_path / "seed0.nc", tmp_path / "seed1.nc"),
        (),
        (),
        (),
    )


DRIVER = """
import sys
from pathlib import Path
from gradlens.sweeps import make_executor, run_sweep
from tests.test_sweeps import sweep
folder = Path(sys.argv[1])
run_sweep(sweep(folder, sleep=3.0), make_executor(folder / "jobs", "local", timeout_min=5))
"""


def test_a_restarted_driver_finds_the_jobs_of_a_killed_one_instead_of_submitting_again(
    tmp_path: Path, executor: object
) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT)
    try:
        until(lambda: started(tmp_path, 3))
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    restarted = run_sweep(sweep(tmp_path, sleep=3.0), executor)
    assert restarted.submitted == () and set(restarted.running) == paths(tmp_path)
    assert sorted(runs(tmp_path)) == [0, 1, 2]
    assert all_done(tmp_path)


def test_a_killed_part_leaves_a_stale_lock_and_an_incomplete_file_and_is_run_again(
    tmp_path: Path, executor: object
) -> None:
    first = run_sweep(sweep(tmp_path, sleep=60.0, seeds=1), executor, wait=False)
    until(lambda: started(tmp_path, 1))
    lock = read_lock(tmp_path / "seed0.nc")
    assert lock is not None and lock.record is not None
    os.kill(lock.record["job"]["pid"], signal.SIGKILL)
    until(lambda: read_lock(tmp_path / "seed0.nc").state == "gone")  # type: ignore[union-attr]
    found = part_state(tmp_path / "seed0.nc", sweep(tmp_path)[0].config, ignore=IGNORE)
    assert found.state == "incomplete" and "not marked complete" in found.reason
    until(first.jobs[0].done)  # its controller ends too (result() would wait 15 s for output)
    again = run_sweep(sweep(tmp_path, seeds=1), executor)
    assert again.submitted == (tmp_path / "seed0.nc",) and again.running == ()
    assert runs(tmp_path) == [0, 0] and all_done(tmp_path, 1)


def test_a_part_whose_running_job_dies_undone_is_submitted_again_within_the_call(
    tmp_path: Path, executor: object
) -> None:
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    here = {"host": socket.gethostname(), "boot": "", "pid": job.pid, "start": None}
    write_lock(tmp_path / "seed0.nc", job=here)  # a job that will end without writing
    done = run_sweep(sweep(tmp_path, seeds=1), executor, poll_s=0.05)
    assert job.poll() is not None
    assert done.running == (tmp_path / "seed0.nc",) and done.submitted == done.running
    assert runs(tmp_path) == [0] and all_done(tmp_path, 1)


def test_only_complete_files_of_this_code_version_are_done(tmp_path: Path) -> None:
    other = {**VERSION, "git_commit": "0" * 40}
    parts = sweep(tmp_path)
    write_part(sweep(tmp_path, version=other)[0].arg)
    write_part(parts[1].arg)
    write_part({**parts[2].arg, "version": {}})  # no provenance attrs
    assert [p.path.name for p in pending_parts(parts)] == ["seed0.nc", "seed2.nc"]
    assert pending_parts(parts, reuse_other_versions=True) == []
    found = part_state(parts[0].path, parts[0].config, version=code_version())
    assert found.state == "other version" and "at commit 000000000000" in found.reason
    with xr.open_dataset(parts[1].path) as ds:  # cut short: the same file, not marked
        unmarked = ds.load().assign_attrs(complete=0)
    unmarked.to_netcdf(parts[1].path)
    assert [p.path.name for p in pending_parts(parts, reuse_other_versions=True)] == ["seed1.nc"]


def test_a_part_file_of_another_config_is_refused_unless_overwrite(tmp_path: Path) -> None:
    for part in sweep(tmp_path)[:2]:
        write_part(part.arg)
    # The same config in another output folder: "out" is ignored, so both are done.
    moved = [Part(p.path, p.fn, p.arg, {**p.config, "out": "elsewhere"}) for p in sweep(tmp_path)]
    assert [p.path.name for p in pending_parts(moved, ignore=IGNORE)] == ["seed2.nc"]
    with pytest.raises(
        FileExistsError, match=r"seed0\.nc was written with other lr(.|\n)*overwrite"
    ):
        pending_parts(sweep(tmp_path, lr=0.2), ignore=IGNORE)
    assert len(pending_parts(sweep(tmp_path, lr=0.2), ignore=IGNORE, overwrite=True)) == 3
    with pytest.raises(FileExistsError, match=r"seed1\.nc stores no config"):
        xr.Dataset(attrs={"note": "x"}).to_netcdf(tmp_path / "seed1.nc", engine="netcdf4")
        pending_parts(sweep(tmp_path), ignore=IGNORE)


def test_a_field_added_later_unset_leaves_earlier_parts_done(tmp_path: Path) -> None:
    """A config field set to None compares as absent: files written before it are reused."""
    for part in sweep(tmp_path)[:1]:
        write_part(part.arg)
    later = [Part(p.path, p.fn, p.arg, {**p.config, "added": None}) for p in sweep(tmp_path)]
    assert [p.path.name for p in pending_parts(later, ignore=IGNORE)] == ["seed1.nc", "seed2.nc"]
    assert stored_config({"a": 1, "added": None, "out": "x"}, IGNORE) == {"a": 1}
    set_later = [Part(p.path, p.fn, p.arg, {**p.config, "added": "rerun"}) for p in sweep(tmp_path)]
    with pytest.raises(FileExistsError, match=r"seed0\.nc was written with other added"):
        pending_parts(set_later, ignore=IGNORE)


def test_a_check_can_refuse_a_part_that_its_config_accepts(tmp_path: Path) -> None:
    write_part(sweep(tmp_path)[0].arg)
    with pytest.raises(FileExistsError, match=r"seed0\.nc: another initialisation"):
        pending_parts(
            sweep(tmp_path),
            ignore=IGNORE,
            check=lambda p: [f"{p.path.name}: another initialisation"],
        )


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def write_lock(part: Path, **record: object) -> None:
    driver = {"host": socket.gethostname(), "boot": "", "pid": os.getpid(), "start": None}
    base = {"token": "t", "cluster": "local", "driver": driver, "job_id": None, "job": None}
    lock_path(part).write_text(json.dumps(base | record))


def test_stale_locks_are_told_from_held_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = tmp_path / "seed0.nc"
    here = {"host": socket.gethostname(), "boot": "", "start": None}
    cases: list[tuple[dict[str, object], str]] = [
        ({"job": {**here, "pid": dead_pid()}}, "gone"),
        ({"job": {**here, "pid": os.getpid()}}, "running"),
        ({"job": {**here, "pid": os.getpid(), "start": 1}}, "gone"),  # the pid was reused
        ({"cluster": "local", "job_id": str(dead_pid())}, "gone"),
        ({"driver": {**here, "pid": dead_pid()}}, "gone"),  # killed before it submitted
        ({"job": {**here, "host": "elsewhere", "pid": 1}}, "unknown"),
    ]
    for record, state in cases:
        write_lock(part, **record)
        assert read_lock(part).state == state, record  # type: ignore[union-attr]
    lock_path(part).write_text('{"tok')  # its writer died mid-write
    assert read_lock(part).state == "gone"  # type: ignore[union-attr]

    bin_ = tmp_path / "bin"  # a fake squeue: what SLURM says about job 7_1
    bin_.mkdir()
    squeue = bin_ / "squeue"
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_), os.environ["PATH"]]))
    away = {"job": {**here, "host": "node1", "pid": 1}, "cluster": "slurm", "job_id": "7_1"}
    for script, state in [
        ("echo RUNNING", "running"),
        ("echo PENDING", "running"),
        ("true", "gone"),
        ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", "gone"),
        ("echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1", "unknown"),
    ]:
        squeue.write_text(f"#!/bin/sh\n{script}\n")
        squeue.chmod(0o755)
        write_lock(part, **away)
        assert read_lock(part).state == state, script  # type: ignore[union-attr]


def test_a_held_lock_refuses_a_second_runner_and_a_stale_one_is_taken_over(
    tmp_path: Path,
) -> None:
    part = tmp_path / "seed0.nc"
    with hold_parts([part]):
        refused = pytest.raises(PartLockedError, match=r"seed0\.nc is being run by an inline run")
        with refused, hold_parts([part]):
            pass
        assert wait_for_parts([], poll_s=0.01) == {}
    assert not lock_path(part).exists()
    write_lock(part, job={"host": "elsewhere", "boot": "", "pid": 1, "start": None})
    refused = pytest.raises(PartLockedError, match="delete the lock if you know that job is gone")
    with refused, hold_parts([part]):
        pass
    assert set(wait_for_parts([part], poll_s=0.01)) == {part}  # not waited for: unknown
    write_lock(part, job={"host": socket.gethostname(), "boot": "", "pid": dead_pid()})
    with hold_parts([part]):
        assert read_lock(part).record["cluster"] == "inline"  # type: ignore[union-attr,index]
    assert not lock_path(part).exists()


# submitit's DebugJob leaves its log files open (a ResourceWarning when they are collected).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_debug_executor_runs_parts_in_this_process_under_their_locks(tmp_path: Path) -> None:
    done = run_sweep(sweep(tmp_path), make_executor(tmp_path / "jobs", cluster="debug"))
    assert len(done.submitted) == 3 and sorted(runs(tmp_path)) == [0, 1, 2]
    assert all_done(tmp_path)


def test_a_part_that_writes_nothing_is_reported(tmp_path: Path, executor: object) -> None:
    part = Part(tmp_path / "never.nc", forget_to_write, {}, {"seed": 0})
    with pytest.raises(RuntimeError, match=r"never\.nc: job \d+ returned without writing it"):
        run_sweep([part], executor)


def test_two_parts_writing_one_path_are_refused(tmp_path: Path) -> None:
    part = sweep(tmp_path)[0]
    with pytest.raises(ValueError, match="give every part its own path"):
        pending_parts([part, part])


def test_every_test_that_the_sweeps_docs_cite_exists() -> None:
    section = (ROOT / "docs" / "scaling.md").read_text().split("## Sweeps on submitit", 1)[1]
    cited = set(re.findall(r"`(?:[\w/.]+::)?(test_\w+)`", section))
    files = [ROOT / "tests" / "test_sweeps.py", *(ROOT / "tests" / "mnist").glob("test_*.py")]
    defined = {n for f in files for n in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert len(cited) >= 10 and cited <= defined, sorted(cited - defined)
