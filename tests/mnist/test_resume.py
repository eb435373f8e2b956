"""An existing --out is resumed or refused, never silently replaced; bad flags fail at once."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import netCDF4
import pytest
import xarray as xr

import subliminal_mnist.dispatch as dispatch
import subliminal_mnist.run as run
from gradlens.records.recorder import open_run
from gradlens.sweeps import is_complete, lock_path
from gradlens.sweeps._locks import this_process
from tests.mnist.test_mnist_aux_quick import data_dir, mnist_aux


def flags(out: Path, *more: str) -> list[str]:
    return [
        "--quick",
        "--seeds",
        "1",
        "--models",
        "2",
        "--conditions",
        "aux",
        "--out",
        str(out),
        "--data-dir",
        data_dir(),
        "--device",
        "cpu",
        "--no-progress",
        *more,
    ]


def config(out: Path, *more: str) -> mnist_aux.Config:
    """A --quick config cut to 3 student steps (the other settings as the flags say)."""
    quick = mnist_aux.parse(flags(out, *more))
    student = dataclasses.replace(quick.student, epochs=1, noise_per_epoch=3 * 1024)
    return dataclasses.replace(quick, student=student, probe_size=256)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Count the (seed, condition) runs; an untrained teacher, no figures (for speed: the
    quick runs of test_mnist_aux_quick train a teacher and draw the figures)."""
    done: list[tuple[int, str]] = []
    run_block_condition = dispatch.run_block_condition

    def counted(condition, block, **kwargs):  # type: ignore[no-untyped-def]
        done.append((kwargs["seed"], condition.name))
        return run_block_condition(condition, block, **kwargs)

    monkeypatch.setattr(dispatch, "run_block_condition", counted)
    monkeypatch.setattr(run, "save_figures", lambda ds, folder: None)
    monkeypatch.setattr(dispatch, "train_teacher_stack", lambda stack, digits, **kwargs: stack)
    return done


def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_mnist(*args: object, **kwargs: object) -> None:
        raise AssertionError("MNIST was loaded")

    monkeypatch.setattr(dispatch, "load_mnist", load_mnist)


def test_a_rerun_resumes_refuses_another_config_and_overwrite_reruns(
    tmp_path: Path, runs: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = xr.load_dataset(mnist_aux.main(config(tmp_path)))
    assert runs == [(0, "aux")]
    part = open_run(tmp_path / "parts" / "seed0_aux.nc")
    stored = json.loads(part.attrs["teacher_metrics"])
    assert stored["teacher_accuracy"] == first["teacher_accuracy"].values.tolist()
    assert len(stored["reference_accuracy"]) == 2 and part.sizes["model"] == 2

    with monkeypatch.context() as patch:  # everything is reused: no data, no training
        no_data(patch)
        again = xr.load_dataset(mnist_aux.main(config(tmp_path)))
    assert runs == [(0, "aux")]
    xr.testing.assert_identical(again.drop_attrs(), first.drop_attrs())
    assert "| teacher |" in (tmp_path / "summary.md").read_text()

    before = (tmp_path / "mnist_aux.nc").read_bytes()
    with monkeypatch.context() as patch:
        no_data(patch)
        with pytest.raises(FileExistsError, match=r"(?s)other student.*Pass --overwrite"):
            mnist_aux.main(config(tmp_path, "--noise", "fresh"))
        with pytest.raises(FileExistsError, match=r"(?s)other models.*Pass --overwrite"):
            mnist_aux.main(config(tmp_path, "--models", "3"))
    assert (tmp_path / "mnist_aux.nc").read_bytes() == before and runs == [(0, "aux")]

    fresh = xr.load_dataset(mnist_aux.main(config(tmp_path, "--noise", "fresh", "--overwrite")))
    assert runs == [(0, "aux"), (0, "aux")]
    assert '"noise": "fresh"' in fresh.attrs["config"]
    assert '"noise": "fresh"' in open_run(tmp_path / "parts" / "seed0_aux.nc").attrs["config"]


def test_a_part_is_a_seeds_block_under_one_condition_and_new_ones_run_alone(
    tmp_path: Path, runs: list[tuple[int, str]]
) -> None:
    mnist_aux.main(config(tmp_path))
    two = xr.load_dataset(mnist_aux.main(config(tmp_path, "--seeds", "2")))
    assert runs == [(0, "aux"), (1, "aux")]  # seed 0's block is reused as it was
    assert two["model"].values.tolist() == [0, 1, 10_000, 10_001]
    assert two["seed"].values.tolist() == [0, 0, 1, 1]
    more = config(tmp_path, "--seeds", "2")
    more = dataclasses.replace(more, conditions=("aux", "cross_init"))
    both = xr.load_dataset(mnist_aux.main(more))
    assert runs[2:] == [(0, "cross_init"), (1, "cross_init")]
    xr.testing.assert_identical(
        both["cosine"].sel(condition="aux").drop_attrs(),
        two["cosine"].sel(condition="aux").drop_attrs(),
    )
    init = json.loads(open_run(tmp_path / "parts" / "seed1_cross_init.nc").attrs["init_seeds"])
    assert init == [10_001, 10_000]  # the other model of the same block


def test_results_of_unknown_origin_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_data(monkeypatch)
    (tmp_path / "summary.md").write_text("an earlier run")
    with pytest.raises(FileExistsError, match=r"(?s)summary.md has no mnist_aux.nc .*--overwrite"):
        mnist_aux.main(config(tmp_path))
    assert (tmp_path / "summary.md").read_text() == "an earlier run"


@pytest.mark.parametrize(
    ("more", "error", "match"),
    [
        (["--device", "cuda:99"], ValueError, r"'cuda:99' is not available .* pass --device cpu"),
        (["--device", "nonsense"], ValueError, r"not a torch device"),
        (["--seeds", "0"], ValueError, r"--seeds must be at least 1, got 0"),
        (
            ["--out", "FILE/out"],
            OSError,
            r"cannot write to the output folder .*choose another with --out",
        ),
    ],
)
def test_bad_settings_fail_before_any_data_or_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, more: list[str], error: type, match: str
) -> None:
    no_data(monkeypatch)
    (tmp_path / "FILE").write_text("a file, not a folder")
    more = [m.replace("FILE", str(tmp_path / "FILE")) for m in more]
    with pytest.raises(error, match=match):
        mnist_aux.main(config(tmp_path / "out", *more))


def test_unknown_conditions_fail_before_any_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_data(monkeypatch)
    bogus = mnist_aux.Config(conditions=("aux", "bogus"), out=tmp_path)
    with pytest.raises(ValueError, match=r"unknown conditions \['bogus'\]; choose from"):
        mnist_aux.main(bogus)


def test_parts_of_other_code_are_run_again_unless_reused_and_each_parts_commit_is_listed(
    tmp_path: Path, runs: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[int] = []
    monkeypatch.setattr(
        dispatch, "train_teacher_stack", lambda stack, digits, **kw: trained.append(1) or stack
    )
    monkeypatch.setenv("GRADLENS_GIT_COMMIT", "a" * 40)
    mnist_aux.main(config(tmp_path))
    part = tmp_path / "parts" / "seed0_aux.nc"
    assert is_complete(part) and open_run(part).attrs["git_commit"] == "a" * 40

    monkeypatch.setenv("GRADLENS_GIT_COMMIT", "b" * 40)
    combined = xr.load_dataset(mnist_aux.main(config(tmp_path)))
    assert runs == [(0, "aux"), (0, "aux")]  # computed by other code: run again
    assert len(trained) == 2  # with this code's teachers, not the cached ones of commit a
    versions = json.loads(combined.attrs["part_versions"])
    assert versions["seed0_aux"]["git_commit"] == "b" * 40

    monkeypatch.setenv("GRADLENS_GIT_COMMIT", "c" * 40)
    with monkeypatch.context() as patch:  # reused as it is: no data, no training
        no_data(patch)
        reused = xr.load_dataset(mnist_aux.main(config(tmp_path, "--reuse-other-versions")))
    assert runs == [(0, "aux"), (0, "aux")]
    assert reused.attrs["git_commit"] == "c" * 40  # the code that combined the parts
    assert json.loads(reused.attrs["part_versions"])["seed0_aux"]["git_commit"] == "b" * 40

    with netCDF4.Dataset(part, "a") as ds:  # as a part cut short: not marked complete
        ds.delncattr("complete")
    mnist_aux.main(config(tmp_path))
    assert runs == [(0, "aux")] * 3 and is_complete(part)


def test_an_inline_run_waits_for_a_part_that_a_live_job_holds_and_never_runs_it_alongside(
    tmp_path: Path,
    runs: list[tuple[int, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    part = tmp_path / "parts" / "seed0_aux.nc"
    part.parent.mkdir(parents=True)
    holder = {"token": "t", "cluster": "local", "job_id": "1", "job": this_process(job.pid)}
    lock_path(part).write_text(json.dumps(holder | {"driver": this_process()}))
    alive_when_run: list[bool] = []
    run_block_condition = dispatch.run_block_condition

    def after_the_job(condition, block, **kwargs):  # type: ignore[no-untyped-def]
        alive_when_run.append(job.poll() is None)
        return run_block_condition(condition, block, **kwargs)

    monkeypatch.setattr(dispatch, "run_block_condition", after_the_job)
    mnist_aux.main(config(tmp_path))
    assert "waiting for 1 parts that earlier jobs are running" in capsys.readouterr().out
    assert alive_when_run == [False] and runs == [(0, "aux")]
    assert not lock_path(part).exists() and is_complete(part)

    lock_path(part).write_text(json.dumps(holder | {"job": {"host": "node7", "pid": 1}}))
    with pytest.raises(SystemExit) as caught:  # a job elsewhere: one line naming the lock
        mnist_aux.cli(flags(tmp_path, "--overwrite"))
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mnist_aux.py: error: ") and f"(lock {lock_path(part)})" in err
    assert "delete the lock if you know that job is gone" in err and runs == [(0, "aux")]
