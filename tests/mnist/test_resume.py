"""An existing --out is resumed or refused, never silently replaced; bad flags fail at once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import xarray as xr

import subliminal_mnist.dispatch as dispatch
import subliminal_mnist.run as run
from gradlens.records.recorder import open_run
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
