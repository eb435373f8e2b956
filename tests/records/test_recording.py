from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from gradlens.records.provenance import config_from_attrs, make_attrs
from gradlens.records.recorder import Recorder, Variable, open_run

LAYERS = ["net.0", "net.2"]
# Fixed times, so that recorders made in different seconds (or processes) compare identical.
ATTRS = {
    "created_at": "2026-01-01T00:00:00+00:00",
    "started_at": "2026-01-01T00:00:00+00:00",
    "seed": 3,
    "lr": 0.1,
}
VARIABLES = {
    "loss": Variable(("step",), "training loss"),
    "accuracy": Variable(("step",), "test accuracy", dtype="float64"),
    "n_correct": Variable(("step",), "correct examples in the batch", dtype="int64"),
    "epoch": Variable(("step",), "epoch", dtype="int32", coord=True),
    "grad_norm": Variable(("step", "layer"), "gradient norm per layer", units="1"),
    "alignment": Variable(("step", "probe"), "alignment with each probe"),
    "example_loss": Variable(("example_step", "example"), "loss of each example", units="nat"),
}


def log_run(rec: Recorder, steps: range) -> None:
    """Log a small run: accuracy every 2nd step, per-example values every 3rd, probe from 7."""
    for step in steps:
        values: dict[str, object] = {
            "loss": torch.tensor(1.0 / (step + 1), requires_grad=True),
            "n_correct": step % 5,
            "epoch": step // 4,
            "grad_norm": torch.arange(2.0) + step,
        }
        if step % 2 == 0:
            values["accuracy"] = step / 10
        if step % 3 == 0:
            values["example_loss"] = np.linspace(0.0, 1.0, 5) * step
        if step >= 7:
            values["alignment"] = [step, -step, 0.5]
        rec.log(step, **values)


def make(path: Path | None, **kwargs: object) -> Recorder:
    return Recorder(path, VARIABLES, coords={"layer": LAYERS}, attrs=ATTRS, **kwargs)


def test_file_and_memory_round_trip_identically(tmp_path: Path) -> None:
    in_memory, on_disk = make(None), make(tmp_path / "run.nc", flush_every=4)
    for rec in (in_memory, on_disk):
        log_run(rec, range(12))
        rec.close()
    expected = in_memory.dataset()
    xr.testing.assert_identical(expected, open_run(tmp_path / "run.nc"))
    xr.testing.assert_identical(expected, on_disk.dataset())

    assert dict(expected.sizes) == {
        "step": 12,
        "layer": 2,
        "probe": 3,
        "example_step": 4,
        "example": 5,
    }
    assert expected["example_step"].values.tolist() == [0, 3, 6, 9]
    assert expected["layer"].values.tolist() == LAYERS
    assert "epoch" in expected.coords and expected["epoch"].dims == ("step",)
    accuracy = expected["accuracy"].values
    assert np.isnan(accuracy[1::2]).all() and accuracy[::2].tolist() == pytest.approx(
        [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    )
    assert np.isnan(expected["alignment"].values[:7]).all()
    assert expected["alignment"].values[7].tolist() == [7.0, -7.0, 0.5]
    assert {name: str(expected[name].dtype) for name in VARIABLES} == {
        name: var.dtype for name, var in VARIABLES.items()
    }


def test_empty_run_round_trips(tmp_path: Path) -> None:
    make(tmp_path / "empty.nc").close()
    in_memory = make(None)
    in_memory.close()
    xr.testing.assert_identical(in_memory.dataset(), open_run(tmp_path / "empty.nc"))


CHILD = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from test_recording import log_run, make
rec = make({path!r}, flush_every=10)
log_run(rec, range(25))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_leaves_every_flushed_row(tmp_path: Path) -> None:
    path = tmp_path / "killed.nc"
    code = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False)
    assert child.returncode == -9

    survived = open_run(path)
    assert survived["step"].values.tolist() == list(range(20))
    expected = make(None)
    log_run(expected, range(20))
    xr.testing.assert_identical(expected.dataset(), survived)


def test_context_manager_closes_and_keeps_the_rows_when_the_body_raises(tmp_path: Path) -> None:
    path = tmp_path / "run.nc"
    with pytest.raises(RuntimeError, match="diverged"), make(path, flush_every=100) as rec:
        log_run(rec, range(3))
        raise RuntimeError("diverged")
    assert open_run(path).sizes["step"] == 3
    with pytest.raises(ValueError, match="closed"):
        rec.log(3, loss=1.0)
    rec.close()


def test_rejects_a_step_that_does_not_increase() -> None:
    rec = make(None)
    log_run(rec, range(3))
    with pytest.raises(
        ValueError, match=r"along 'step' must strictly increase: got step 2 after 2"
    ):
        rec.log(2, loss=0.5, n_correct=1, epoch=0)
    rec.log(4, example_loss=np.zeros(5))
    with pytest.raises(ValueError, match=r"along 'example_step' .* got step 4 after 4"):
        rec.log(4, loss=0.5, n_correct=1, epoch=0, example_loss=np.zeros(5))
    assert rec.dataset().sizes["step"] == 3  # the failed call logged nothing


def test_rejects_unknown_and_missing_int_variables() -> None:
    rec = make(None)
    with pytest.raises(ValueError, match=r"unknown variables \['los'\]; declared: \['loss'"):
        rec.log(0, los=1.0)
    with pytest.raises(ValueError, match=r"int variables \['n_correct', 'epoch'\]"):
        rec.log(0, loss=1.0)
    with pytest.raises(ValueError, match="declared int64 but got values of float"):
        rec.log(0, loss=1.0, n_correct=1.5, epoch=0)


def test_rejects_a_shape_that_changes() -> None:
    rec = make(None)
    log_run(rec, range(1))
    with pytest.raises(
        ValueError,
        match=r"'example_loss' has dims \('example_step', 'example'\), so each row has shape "
        r"\(5,\), but got a value of shape \(4,\)",
    ):
        rec.log(3, example_loss=np.zeros(4))
    with pytest.raises(ValueError, match=r"'grad_norm' .* shape \(2,\), but got .* \(3,\)"):
        rec.log(1, loss=1.0, n_correct=1, epoch=0, grad_norm=np.zeros(3))


def test_refuses_to_overwrite_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "run.nc"
    path.write_text("an earlier run")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        make(path)
    assert path.read_text() == "an earlier run"
    with make(path, overwrite=True) as rec:
        log_run(rec, range(2))
    assert open_run(path).sizes["step"] == 2


def test_rejects_bad_declarations() -> None:
    with pytest.raises(TypeError, match="tuple of dim names"):
        Variable("step", "loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be"):
        Variable(("step",), "loss", dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="record dims of other variables"):
        Recorder(None, {"a": Variable(("step",), "a"), "b": Variable(("epoch", "step"), "b")})
    with pytest.raises(ValueError, match="coords for record dim 'step'"):
        Recorder(None, {"a": Variable(("step",), "a")}, coords={"step": [0, 1]})
    with pytest.raises(TypeError, match=r"attrs\['debug'\] is a bool"):
        Recorder(None, {"a": Variable(("step",), "a")}, attrs={"debug": True})  # type: ignore[dict-item]


def test_every_variable_has_long_name_and_units_and_attrs_are_provenance(tmp_path: Path) -> None:
    config = {"lr": 0.1, "out": tmp_path, "widths": (8, 8)}
    with Recorder(tmp_path / "run.nc", VARIABLES, coords={"layer": LAYERS}, config=config) as rec:
        log_run(rec, range(4))
    ds = open_run(tmp_path / "run.nc")
    for name, variable in ds.variables.items():
        assert isinstance(variable.attrs["long_name"], str), name
        assert isinstance(variable.attrs["units"], str), name
    assert ds["step"].attrs["long_name"] == "training step"
    assert all(
        isinstance(v, str) for k, v in ds.attrs.items() if k not in ("git_dirty", "complete")
    )
    assert int(ds.attrs["git_dirty"]) in (-1, 0, 1) and ds.attrs["complete"] == 1
    assert ds.attrs["git_commit"] == make_attrs()["git_commit"]
    assert config_from_attrs(ds.attrs) == {"lr": 0.1, "out": str(tmp_path), "widths": [8, 8]}


def test_tensors_on_the_accelerator_are_detached_and_copied() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rec = Recorder(None, {"g": Variable(("step", "layer"), "gradient", dtype="float64")})
    weight = torch.ones(3, device=device, dtype=torch.bfloat16, requires_grad=True)
    rec.log(0, g=weight * 2)
    assert rec.dataset()["g"].values.tolist() == [[2.0, 2.0, 2.0]]


def test_rows_reach_the_file_every_flush_every_rows(tmp_path: Path) -> None:
    rec = make(tmp_path / "run.nc", flush_every=5)
    log_run(rec, range(5))
    assert (tmp_path / "run.nc").exists() and open_run(tmp_path / "run.nc").sizes["step"] == 5
    log_run(rec, range(5, 8))
    assert open_run(tmp_path / "run.nc").sizes["step"] == 5
    assert rec.dataset().sizes["step"] == 8
