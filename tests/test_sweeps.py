"""gradlens.sweeps on submitit's local executor: parts run, failures surface, resubmission skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xarray as xr

from gradlens import open_run
from gradlens.sweeps import Part, make_executor, pending_parts, run_sweep
from tests._sweep_parts import forget_to_write, write_part

ROOT = Path(__file__).resolve().parents[1]
IGNORE = {"out"}  # a field that says where the sweep goes, not what a part holds


def sweep(folder: Path, *, lr: float = 0.1, fail: int | None = None) -> list[Part]:
    log = folder / "runs.log"
    parts = []
    for seed in range(3):
        config = {"seed": seed, "lr": lr, "out": str(folder)}
        path = folder / f"seed{seed}.nc"
        arg = {"path": str(path), "seed": seed, "log": str(log), "config": config}
        parts.append(Part(path, write_part, arg | {"fail": seed == fail}, config))
    return parts


def runs(folder: Path) -> list[int]:
    log = folder / "runs.log"
    return [int(s) for s in log.read_text().split()] if log.exists() else []


def test_local_sweep_reports_a_failed_part_and_a_resubmission_runs_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The jobs are fresh interpreters: they find tests._sweep_parts through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    executor = make_executor(tmp_path / "jobs", cluster="local", timeout_min=5)

    with pytest.raises(
        RuntimeError, match=r"(?s)1 of 3 parts did not finish:\n.*seed2\.nc.*told to fail"
    ):
        run_sweep(sweep(tmp_path, fail=2), executor)
    assert sorted(runs(tmp_path)) == [0, 1]
    assert not (tmp_path / "seed2.nc").exists()

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


def test_a_check_can_refuse_a_part_that_its_config_accepts(tmp_path: Path) -> None:
    write_part(sweep(tmp_path)[0].arg)
    with pytest.raises(FileExistsError, match=r"seed0\.nc: another initialisation"):
        pending_parts(
            sweep(tmp_path),
            ignore=IGNORE,
            check=lambda p: [f"{p.path.name}: another initialisation"],
        )


def test_a_part_that_writes_nothing_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    executor = make_executor(tmp_path / "jobs", cluster="local", timeout_min=5)
    part = Part(tmp_path / "never.nc", forget_to_write, {}, {"seed": 0})
    with pytest.raises(RuntimeError, match=r"never\.nc: job \d+ returned without writing it"):
        run_sweep([part], executor)


def test_two_parts_writing_one_path_are_refused(tmp_path: Path) -> None:
    part = sweep(tmp_path)[0]
    with pytest.raises(ValueError, match="give every part its own path"):
        pending_parts([part, part])
