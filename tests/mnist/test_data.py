from pathlib import Path

import pytest

from gradlens.errors import DataNotFoundError
from subliminal_mnist.data import DATA_DIR_ENV, candidate_roots, load_mnist

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_missing_data_names_every_path_tried_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as info:
        load_mnist()
    message = str(info.value)
    assert str(tmp_path / "env" / "MNIST" / "raw") in message
    assert str(tmp_path / "cache" / "gradlens" / "MNIST" / "raw") in message
    assert DATA_DIR_ENV in message and "--data-dir" in message


def test_explicit_root_is_the_only_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, "/somewhere")
    assert candidate_roots("/explicit") == [Path("/explicit")]
    assert candidate_roots()[0] == Path("/somewhere")


def data_root() -> Path:
    import os

    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) if root else SHARED


def test_mnist_test_split_loads_scaled_from_the_data_dir() -> None:
    root = data_root()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found under {root}; set {DATA_DIR_ENV} (see README).")
    digits = load_mnist(root, train=False)
    assert digits.images.shape == (10_000, 784)
    assert float(digits.images.min()) == -1.0 and float(digits.images.max()) == 1.0
    assert digits.labels[:4].tolist() == [7, 2, 1, 0]
