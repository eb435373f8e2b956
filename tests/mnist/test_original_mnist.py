"""experiments/original_mnist.py imports the original script without running it, and says
what to pass when the checkout is missing."""

from __future__ import annotations

from pathlib import Path

import original_mnist
import pytest

STAND_IN = """
import torch as t
N_MODELS = 100
ran_main = False
if __name__ == "__main__":
    ran_main = True
"""


def test_the_original_is_imported_as_a_module_and_its_main_block_does_not_run(
    tmp_path: Path,
) -> None:
    script = tmp_path / original_mnist.SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text(STAND_IN)
    module = original_mnist.load_original(tmp_path)
    assert module.N_MODELS == 100 and module.ran_main is False


def test_a_missing_checkout_exits_with_one_line_naming_the_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        original_mnist.main(["--original", str(tmp_path / "nowhere")])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in err
    assert "MinhxLe/subliminal-learning" in err and "Traceback" not in err


def test_models_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        original_mnist.main(["--original", ".", "--models", "0"])
    assert caught.value.code == 2
    assert "--models must be at least 1, got 0." in capsys.readouterr().err
