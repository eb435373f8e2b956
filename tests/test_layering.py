"""The core knows no experiment: nothing in ``gradlens/`` imports ``subliminal_mnist`` or
``experiments`` (the MNIST setting lives in ``experiments/subliminal_mnist``, not installed)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradlens"
CORE = sorted(PACKAGE.rglob("*.py"))
EXPERIMENTS = ("subliminal_mnist", "experiments")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", CORE, ids=module_name)
def test_core_module_does_not_import_the_mnist_setting(path: Path) -> None:
    bad = sorted(n for n in imported(path) if n.split(".")[0] in EXPERIMENTS)
    assert not bad, f"{module_name(path)} imports {bad}; the core must not know the experiment."


def test_the_installed_package_holds_no_mnist_setting() -> None:
    found = sorted(p.name for p in (PACKAGE / "mnist").glob("*.py"))
    assert not found, f"gradlens/mnist holds {found}; the setting is experiments/subliminal_mnist"


def test_importing_every_core_module_leaves_the_mnist_setting_unloaded() -> None:
    modules = [module_name(p) for p in CORE]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXPERIMENTS!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_experiment_names_are_not_top_level_exports() -> None:
    import gradlens

    for name in ("Digits", "load_mnist", "liminal_loss", "liminal_weight"):
        assert name not in gradlens.__all__ and not hasattr(gradlens, name), name
