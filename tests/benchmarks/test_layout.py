"""The harness is one package, imported by a name no dependency installs, without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from gradlens_bench.nets import init_mlp
from tests.benchmarks._cli import BENCH, run

PACKAGE = BENCH / "gradlens_bench"
MODULES = sorted(PACKAGE.glob("*.py"))
FORBIDDEN = ("benchmarks", "experiments", "gradlens.mnist")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top, in a function or under ``TYPE_CHECKING``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: inside the package
                base = ".".join(filter(None, ["gradlens_bench", base]))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", [*MODULES, *sorted(Path(__file__).parent.glob("*.py"))])
def test_nothing_imports_a_clashing_name_or_an_experiment(path: Path) -> None:
    bad = sorted(n for n in imports(path) if n.split(".")[0] in FORBIDDEN[:2])
    bad += sorted(n for n in imports(path) if f"{n}.".startswith("gradlens.mnist."))
    assert not bad, f"{path.name} imports {bad}"


def test_the_harness_has_no_import_cycle() -> None:
    own = {p.stem for p in MODULES} - {"__init__"}
    graph = {
        p.stem: {n.split(".")[1] for n in imports(p) if n.startswith("gradlens_bench.")} & own
        for p in MODULES
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for dep in sorted(graph[module]):
                visit(dep, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_student_mlp_keeps_the_experiments_initialisation() -> None:
    """Pinned draws of ``init_mlp((784, 256, 256, 13), seed=0)``, taken from the experiment's."""
    net = init_mlp((784, 256, 256, 13), seed=0)
    expected = torch.tensor([-0.040208566933870316, -0.04115572199225426, -0.008949235081672668])
    torch.testing.assert_close(net[0].weight[0, :3], expected)
    torch.testing.assert_close(net[4].weight[-1, -2:], torch.tensor([0.0255626328, -0.0722410679]))
    assert all(int(torch.count_nonzero(layer.bias)) == 0 for layer in net[::2])


@pytest.mark.parametrize(
    "entry",
    [["-m", "gradlens_bench.profile_case"], ["benchmarks/gradlens_bench/profile_case.py"]],
    ids=["module", "file"],
)
def test_profile_case_runs_in_both_forms(entry: list[str]) -> None:
    out = run(*entry, "tokens:4:plain", "ddp_mlp:4:ddp_probed", "--repeats", "1")
    assert "## tokens:4:plain" in out and "## ddp_mlp:4:ddp_probed" in out
