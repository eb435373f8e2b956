"""--executor local runs the (seed, condition) parts as submitit jobs, the same as inline."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import xarray as xr

import subliminal_mnist.dispatch as dispatch
import subliminal_mnist.run as run
from subliminal_mnist import Dispatch
from tests.mnist.test_mnist_aux_quick import ROOT, data_dir, mnist_aux


def tiny(out: Path, *more: str) -> mnist_aux.Config:
    """Two conditions of one seed's block of 2 small models, 3 student steps."""
    flags = ["--quick", "--seeds", "1", "--models", "2", "--conditions", "aux", "cross_init"]
    flags += ["--out", str(out), "--data-dir", data_dir(), "--device", "cpu", "--no-progress"]
    config = mnist_aux.parse([*flags, *more])
    student = dataclasses.replace(config.student, epochs=1, noise_per_epoch=3 * 1024)
    return dataclasses.replace(config, sizes=(784, 32, 32, 13), student=student, probe_size=256)


def stored_config(path: Path) -> dict[str, object]:
    with xr.open_dataset(path, engine="netcdf4") as run:
        found = json.loads(run.attrs["config"])
    return {k: v for k, v in found.items() if k != "out"}


def test_local_jobs_match_inline_and_a_resubmission_runs_only_the_missing_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The jobs are fresh interpreters: they import this checkout's gradlens through PYTHONPATH
    # (run_parts adds the folder of subliminal_mnist itself).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(run, "save_figures", lambda ds, folder: None)
    sweeps: list[object] = []
    run_sweep = dispatch.run_sweep

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        sweeps.append(run_sweep(*args, **kwargs))
        return sweeps[-1]

    monkeypatch.setattr(dispatch, "run_sweep", recorded)
    local = Dispatch("local", timeout_min=5)

    inline = xr.load_dataset(mnist_aux.main(tiny(tmp_path / "inline")))
    jobs = xr.load_dataset(mnist_aux.main(tiny(tmp_path / "jobs"), local))
    # A job is a fresh interpreter that may run with another thread count, which changes the
    # order of a parallel sum: the same computation, equal to float32 rounding, not bit for bit.
    # atol covers differences of nearby losses (measured_change: two losses near 2.4 whose
    # float32 rounding, about 1e-6 each, does not shrink with their difference of 0.007).
    xr.testing.assert_allclose(jobs.drop_attrs(), inline.drop_attrs(), rtol=1e-5, atol=1e-5)
    assert list(jobs.coords) == list(inline.coords) and list(jobs) == list(inline)
    assert list(jobs.condition.values) == ["aux", "cross_init"]
    parts = tmp_path / "jobs" / "parts"
    for name in ("seed0_aux.nc", "seed0_cross_init.nc"):  # the same part files, but for --out
        assert stored_config(parts / name) == stored_config(tmp_path / "inline" / "parts" / name)
    assert len(sweeps[0].submitted) == 2 and not sweeps[0].skipped
    assert "local submitit jobs" in jobs.attrs["device"]
    assert not list(parts.glob("*.lock"))  # each job removed its part's lock when it returned
    versions = json.loads(jobs.attrs["part_versions"])
    assert {v["git_commit"] for v in versions.values()} == {jobs.attrs["git_commit"]}

    teachers = parts / "seed0_teachers.pt"
    kept = (parts / "seed0_aux.nc").stat().st_mtime_ns, teachers.stat().st_mtime_ns
    (parts / "seed0_cross_init.nc").unlink()
    again = xr.load_dataset(mnist_aux.main(tiny(tmp_path / "jobs"), local))
    assert [p.name for p in sweeps[1].submitted] == ["seed0_cross_init.nc"]
    assert [p.name for p in sweeps[1].skipped] == ["seed0_aux.nc"]
    assert ((parts / "seed0_aux.nc").stat().st_mtime_ns, teachers.stat().st_mtime_ns) == kept
    # The rerun part is a job again, as in the first jobs run: the same computation in the same
    # kind of process, bit for bit.
    xr.testing.assert_identical(again.drop_attrs(), jobs.drop_attrs())


def test_job_flags_map_onto_submitit_parameters() -> None:
    flags = ["--executor", "slurm", "--slurm-partition", "gpu", "--gpus-per-part", "1"]
    flags += ["--time-limit", "90", "--submitit", "mem_gb=32", "slurm_account=lab"]
    found = mnist_aux.parse_dispatch(flags)
    assert found == Dispatch(
        "slurm",
        90,
        {"slurm_partition": "gpu", "gpus_per_node": 1, "mem_gb": 32, "slurm_account": "lab"},
    )
    assert mnist_aux.parse_dispatch([]) == Dispatch()
    with pytest.raises(ValueError, match="--executor inline"):
        mnist_aux.parse_dispatch(["--slurm-partition", "gpu"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        mnist_aux.parse_dispatch(["--executor", "local", "--submitit", "mem_gb"])
