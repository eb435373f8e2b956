"""The core knows no experiment: nothing in ``gradlens/`` imports ``subliminal_mnist`` or
``experiments`` (the MNIST setting lives in ``experiments/subliminal_mnist``, not installed)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradlens"
CORE = sorted(PACKAGE.rglob("*.py"))
EXPERIMENTS = ("subliminal_mnist", "subliminal_lm", "experiments")


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


LEVELS: dict[str, int] = {
    "errors": 0,
    "numerics": 0,
    "compiling": 1,
    "_version": 0,
    "stats": 0,
    "alignment": 1,
    "records": 1,
    "probes": 2,
    "transforms": 2,
    "figures": 2,
    "sweeps": 2,
    "training": 3,
    "integrations": 4,
}
"""The stages, in the order a probed step's data flows: a stage imports only lower levels."""


def stage_of(module: str) -> str:
    return module.split(".")[1]


STAGED = [p for p in CORE if len(p.relative_to(PACKAGE).parts) > 1 or p.stem in LEVELS]


@pytest.mark.parametrize("path", STAGED, ids=module_name)
def test_a_stage_imports_only_the_stages_below_it(path: Path) -> None:
    mine = stage_of(module_name(path))
    found = {
        n
        for n in imported(path)
        if n.startswith("gradlens.") and stage_of(n) in LEVELS and stage_of(n) != mine
    }
    bad = sorted(n for n in found if LEVELS[stage_of(n)] >= LEVELS[mine])
    assert not bad, f"{module_name(path)} (level {LEVELS[mine]}) imports {bad} at or above it."


def test_every_stage_has_a_level() -> None:
    stages = {stage_of(module_name(p)) for p in CORE if module_name(p) != "gradlens"}
    assert stages - {"_moved"} <= set(LEVELS), sorted(stages - set(LEVELS))


def test_the_top_level_face_is_small_and_old_paths_still_work_with_a_warning() -> None:
    code = (
        "import sys, warnings, gradlens\n"
        "assert len(gradlens.__all__) <= 30, len(gradlens.__all__)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import gradlens.ghost, gradlens.recording\n"
        "    from gradlens import summarize\n"
        "assert gradlens.ghost.per_example_dots is gradlens.probes.per_example_dots\n"
        "assert summarize is sys.modules['gradlens.alignment'].summarize\n"
        "print(*sorted(str(w.message).split()[0] for w in seen"
        " if w.category is DeprecationWarning))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gradlens.ghost", "gradlens.recording", "gradlens.summarize"]
