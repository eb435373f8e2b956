"""probed_step(compile=...) gives the eager step's records and parameters, in float64.

The default tests compile with ``backend="aot_eager"`` (dynamo traces every compiled
part and AOT autograd runs its graph; no code generation, so they take seconds);
the inductor run, minutes on this CPU, is behind ``--runslow``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, probed_step
from gradlens.compiling import Compile, CompileError
from gradlens.transforms import remove_aligned
from tests.zoo import make, make_forms

AOT = Compile(backend="aot_eager")
EVEN_KERNEL = "ignore:Using padding=.same. with even kernel:UserWarning"
"""torch's own warning, from the eager forward of Convs1d's padding="same" layer (test_forms.py)."""

# (model, method, the paths the plan takes): the factored forms (linear on a time-major
# input; conv1d variants; an embedding and a weight read twice, combined), and the
# vmap path (asked for, and chosen by the plan for a weight also read functionally).
CASES = {
    "time_major ghost": ("time_major", "auto", {"ghost"}),
    "convs1d ghost": ("convs1d", "auto", {"ghost"}),
    "shared_uses ghost": ("shared_uses", "auto", {"ghost"}),
    "time_major vmap": ("time_major", "vmap", {"vmap"}),
    "functional_reuse vmap": ("functional_reuse", "auto", {"vmap"}),
}


def built(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    return make_forms(kind) if kind in ("convs1d", "shared_uses") else make(kind)


def steps(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    count: int = 2,
    **options: Any,
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor], set[str]]:
    """``count`` probed steps (SGD with momentum, remove_aligned): records, parameters, paths."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    half = inputs.shape[0] // 2
    train = Objective(F.cross_entropy, inputs, (labels,))
    trait = Objective(F.cross_entropy, inputs[:half].flip(0), (labels[:half].flip(0),))
    before = remove_aligned()
    state = before.init(dict(model.named_parameters()))
    found, paths = [], set()
    for k in range(count):
        out = probed_step(
            model, opt, train, trait, before=before, before_state=state, step=k, **options
        )
        state = out.before_state
        found.append({**out.records, "example_cosine": out.example_cosine})
        paths |= {e.path for e in out.plan.values()}
    return found, {n: p.detach().clone() for n, p in model.named_parameters()}, paths


def assert_same_steps(
    got: tuple[list[dict[str, Tensor]], dict[str, Tensor], set[str]],
    want: tuple[list[dict[str, Tensor]], dict[str, Tensor], set[str]],
) -> None:
    for k, (mine, theirs) in enumerate(zip(got[0], want[0], strict=True)):
        assert mine.keys() == theirs.keys(), k
        for name, value in theirs.items():
            torch.testing.assert_close(
                mine[name], value, rtol=1e-9, atol=1e-12, equal_nan=True, msg=f"{k} {name}"
            )
    assert got[1].keys() == want[1].keys()
    for name, value in want[1].items():
        torch.testing.assert_close(got[1][name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert got[2] == want[2]


@pytest.mark.filterwarnings(EVEN_KERNEL)
@pytest.mark.parametrize("case", list(CASES))
def test_a_compiled_step_gives_the_eager_records_and_parameters(case: str) -> None:
    kind, method, paths = CASES[case]
    model, inputs, labels = built(kind)
    want = steps(copy.deepcopy(model), inputs, labels, method=method)
    assert want[2] == paths  # the case takes the path it is named for
    got = steps(model, inputs, labels, method=method, compile=AOT)
    assert_same_steps(got, want)
    first, last = want[0][0], want[0][-1]
    assert not torch.allclose(first["cosine"], last["cosine"])  # the steps moved the model


def recording(graphs: list[torch.fx.GraphModule], **options: Any) -> Compile:
    """Compile options whose backend keeps each graph dynamo hands it, and runs it as traced."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        del example_inputs
        graphs.append(gm)
        return gm.forward

    return Compile(backend=backend, **options)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_the_compiled_parts_go_through_torch_compile(method: str) -> None:
    model, inputs, labels = built("time_major")
    graphs: list[torch.fx.GraphModule] = []
    want = steps(copy.deepcopy(model), inputs, labels, count=1, method=method)
    got = steps(model, inputs, labels, count=1, method=method, compile=recording(graphs))
    assert_same_steps(got, want)
    # The ghost forms or the vmap reductions, the gradient's records, the update's records:
    # each at least one graph (a graph break may split a part in more); a new backend
    # compiles anew, whatever an earlier test compiled.
    assert len(graphs) >= 3, len(graphs)
    assert all(gm.graph.find_nodes(op="placeholder") for gm in graphs)


def test_parts_left_out_run_eagerly() -> None:
    model, inputs, labels = built("time_major")
    want = steps(copy.deepcopy(model), inputs, labels, count=1)
    graphs: list[torch.fx.GraphModule] = []
    got = steps(copy.deepcopy(model), inputs, labels, count=1, compile=recording(graphs, parts=()))
    assert_same_steps(got, want)
    assert graphs == []
    got = steps(model, inputs, labels, count=1, compile=recording(graphs, parts=("records",)))
    assert_same_steps(got, want)
    # the gradient's and the update's records only, no form (whose inputs are a call's)
    assert 2 <= len(graphs) < 4, len(graphs)
    with pytest.raises(ValueError, match="forms"):
        Compile(parts=("ghost",))  # type: ignore[arg-type]


def test_a_part_past_the_recompile_limit_runs_eagerly() -> None:
    model, inputs, labels = built("time_major")  # two linear layers of two shapes
    want = steps(copy.deepcopy(model), inputs, labels, count=1)
    unlimited: list[torch.fx.GraphModule] = []
    steps(copy.deepcopy(model), inputs, labels, count=1, compile=recording(unlimited))
    # Compile(recompile_limit=...) only raises dynamo's global limit: lower both
    limited: list[torch.fx.GraphModule] = []
    try:
        with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch would delete it)
            options = recording(limited, recompile_limit=1)
            got = steps(model, inputs, labels, count=1, compile=options)
    finally:
        torch._dynamo.reset()  # a function past the limit stays eager in this process
    assert_same_steps(got, want)
    assert len(limited) < len(unlimited)  # the limit was met: the second linear ran eagerly


def test_cuda_graphs_are_refused_off_a_gpu_before_any_forward() -> None:
    model, inputs, labels = built("time_major")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"CUDA device.*compile=True") as err:
        steps(model, inputs, labels, count=1, compile=Compile(cuda_graphs=True))
    assert "cpu" in str(err.value)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # nothing ran


def test_a_backend_that_cannot_compile_names_the_fix() -> None:
    def broken(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., Any]:
        raise RuntimeError("no C++ compiler found")

    model, inputs, labels = built("time_major")
    with pytest.raises(CompileError, match=r"no C\+\+ compiler found.*aot_eager"):
        steps(model, inputs, labels, count=1, compile=Compile(backend=broken))


@pytest.mark.parametrize("compile", [1, "inductor"])
def test_compile_takes_a_bool_or_compile_options(compile: object) -> None:
    model, inputs, labels = built("time_major")
    with pytest.raises(TypeError, match="Compile"):
        steps(model, inputs, labels, count=1, compile=compile)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["time_major ghost", "time_major vmap"])
def test_an_inductor_compiled_step_gives_the_eager_records(case: str) -> None:
    kind, method, _ = CASES[case]
    model, inputs, labels = built(kind)
    want = steps(copy.deepcopy(model), inputs, labels, method=method)
    got = steps(model, inputs, labels, method=method, compile=True)
    assert_same_steps(got, want)
