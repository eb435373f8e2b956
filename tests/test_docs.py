"""The API reference names every public name, of the core and of the MNIST setting."""

import re
from pathlib import Path
from types import ModuleType

import pytest

import gradlens
import gradlens.figures.plots
import subliminal_mnist

API = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


@pytest.mark.parametrize(
    "module", [gradlens, gradlens.figures.plots, subliminal_mnist], ids=lambda m: m.__name__
)
def test_every_public_name_is_in_the_api_reference(module: ModuleType) -> None:
    missing = [n for n in module.__all__ if n != "__version__" and f"`{n}" not in API]
    assert not missing, f"document these in docs/api.md: {missing}"


DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # sdpa under vmap
def test_the_models_page_runs() -> None:
    pytest.importorskip("transformers")
    blocks = _python_blocks((DOCS / "models.md").read_text())
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/models.md", "exec"), {"__name__": "docs_models"})


def test_the_recording_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the page writes its run files to the working directory
    blocks = _python_blocks((DOCS / "recording.md").read_text())
    assert len(blocks) >= 3
    namespace: dict[str, object] = {"__name__": "docs_recording"}
    for block in blocks:  # in order: later blocks use the names of earlier ones
        exec(compile(block, "docs/recording.md", "exec"), namespace)
    assert '"path": "ghost"' in open_plan(tmp_path / "planned.nc")


def open_plan(path: Path) -> str:
    return gradlens.open_run(path).attrs["plan"]
