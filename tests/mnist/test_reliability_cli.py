"""Bad flags of the experiment end in one argparse-style line, before any data (issue 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mnist.test_mnist_aux_quick import mnist_aux
from tests.mnist.test_resume import no_data


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--seeds", "0"], "--seeds must be at least 1, got 0."),
        (["--seeds", "-2"], "--seeds must be at least 1, got -2."),
        (["--device", "cuda:99"], "--device 'cuda:99' is not available on this machine"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--out", "FILE/out"], "cannot write to the output folder"),
        (
            ["--liminal-lambda0", "-1"],
            "--liminal-lambda0 must be a finite number >= 0 (the liminal weight at step 0), "
            "got -1.0.",
        ),
        (["--liminal-lambda0", "nan"], "--liminal-lambda0 must be a finite number >= 0"),
        (["--models", "0"], "--models must be in 1..10000, got 0."),
        (["--probe-size", "60001"], "--probe-size must be in 1..60000 (the training images)"),
        (["--probe-size", "0"], "--probe-size must be in 1..60000"),
        (["--sgd-lr", "0"], "--sgd-lr must be a finite number > 0, got 0.0."),
    ],
)
def test_a_bad_flag_exits_with_one_line_and_status_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    line: str,
) -> None:
    no_data(monkeypatch)
    (tmp_path / "FILE").write_text("a file, not a folder")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    with pytest.raises(SystemExit) as caught:
        mnist_aux.cli(["--quick", "--device", "cpu", "--no-progress", *out, *flags])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnist_aux.py: error: ") and line in err
    assert "Traceback" not in err


def test_a_flag_argparse_refuses_exits_the_same_way(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        mnist_aux.cli(["--seeds", "two"])
    assert caught.value.code == 2
    assert "error: argument --seeds: invalid int value: 'two'" in capsys.readouterr().err


def test_results_of_another_run_in_out_end_in_one_line_naming_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_data(monkeypatch)
    (tmp_path / "summary.md").write_text("an earlier run")
    with pytest.raises(SystemExit) as caught:
        mnist_aux.cli(["--quick", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mnist_aux.py: error: ") and "--overwrite" in err
    assert "Traceback" not in err and (tmp_path / "summary.md").read_text() == "an earlier run"
