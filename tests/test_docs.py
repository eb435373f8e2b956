"""The API reference names every public name, of the core and of the MNIST setting."""

from pathlib import Path
from types import ModuleType

import pytest

import gradlens
import gradlens.mnist
import gradlens.plotting

API = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


@pytest.mark.parametrize(
    "module", [gradlens, gradlens.plotting, gradlens.mnist], ids=lambda m: m.__name__
)
def test_every_public_name_is_in_the_api_reference(module: ModuleType) -> None:
    missing = [n for n in module.__all__ if n != "__version__" and f"`{n}" not in API]
    assert not missing, f"document these in docs/api.md: {missing}"
