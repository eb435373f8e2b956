from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import Tensor, nn
from torch.testing import assert_close

from gradlens import per_example_grads
from gradlens.errors import GradientMismatchError
from gradlens.probes import mean_grad
from gradlens.transforms import (
    ScaleAlignedPerExampleState,
    Scope,
    identity,
    remove_aligned_per_example,
    reverse_aligned_per_example,
    scale_aligned,
    scale_aligned_per_example,
)

from ._cases import Problem, example_dots, problems

SETTINGS = [
    (alpha, scope, only_positive)
    for alpha in (0.0, -1.0, 0.5)
    for scope in ("global", "layer")
    for only_positive in (False, True)
]


def distillation_batch() -> tuple[dict[str, Tensor], dict[str, Tensor], tuple]:
    """Per-example gradients of a float64 MLP, and a "trait" reference gradient."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    # The trait: predicting class 0; with this seed examples lie on both sides of it.
    reference = mean_grad(model, F.cross_entropy, x[:4], torch.zeros(4, dtype=torch.long))
    examples = per_example_grads(model, F.cross_entropy, x, y)
    return examples, reference, (model, x, y)


def materialised(
    alpha: float, scope: Scope, only_positive: bool, examples: dict, reference: dict
) -> dict[str, Tensor]:
    """Each example's gradient through the plain transform, then averaged."""
    tx = scale_aligned(alpha, scope, only_positive)
    n = next(iter(examples.values())).shape[0]
    outs = []
    for i in range(n):
        g_i = {name: value[i] for name, value in examples.items()}
        outs.append(tx.update(g_i, tx.init(g_i), reference=reference)[0])
    return {name: torch.stack([out[name] for out in outs]).mean(0) for name in examples}


def run_per_example(
    alpha: float, scope: Scope, only_positive: bool, examples: dict, reference: dict, dots: dict
) -> tuple[dict[str, Tensor], ScaleAlignedPerExampleState]:
    grads = {name: value.mean(0) for name, value in examples.items()}
    tx = scale_aligned_per_example(alpha, scope, only_positive)
    return tx.update(grads, tx.init(grads), reference=reference, example_dots=dots)


@pytest.mark.parametrize(("alpha", "scope", "only_positive"), SETTINGS)
def test_equals_the_materialised_per_example_computation(
    alpha: float, scope: Scope, only_positive: bool
) -> None:
    examples, reference, _ = distillation_batch()
    dots = example_dots(examples, reference)
    out, state = run_per_example(alpha, scope, only_positive, examples, reference, dots)
    assert_close(out, materialised(alpha, scope, only_positive, examples, reference))
    if only_positive:  # the batch has examples on both sides of the reference
        assert ((state.acted > 0) & (state.acted < 1)).all(), state.acted


@pytest.mark.parametrize("method", ["auto", "ghost"])
@pytest.mark.parametrize(("alpha", "scope", "only_positive"), SETTINGS)
def test_with_ghost_dots(alpha: float, scope: Scope, only_positive: bool, method: str) -> None:
    from gradlens.probes.ghost import per_example_dots

    examples, reference, (model, x, y) = distillation_batch()
    dots, _ = per_example_dots(model, F.cross_entropy, x, y, reference=reference, method=method)
    out, _ = run_per_example(alpha, scope, only_positive, examples, reference, dots)
    assert_close(out, materialised(alpha, scope, only_positive, examples, reference))


@pytest.mark.parametrize(("alpha", "scope"), [(a, s) for a, s, p in SETTINGS if not p])
@given(problem=problems())
@settings(max_examples=10)
def test_without_only_positive_equals_the_global_transform(
    alpha: float, scope: Scope, problem: Problem
) -> None:
    out, state = run_per_example(
        alpha, scope, False, problem.examples, problem.reference, problem.example_dots
    )
    tx = scale_aligned(alpha, scope)
    expected, plain = tx.update(problem.grads, tx.init(problem.grads), reference=problem.reference)
    assert_close(out, expected)
    assert_close(state.coef, plain.coef)
    assert_close(state.cosine_before, plain.cosine_before)


@pytest.mark.parametrize(("scope", "only_positive"), [(s, p) for a, s, p in SETTINGS if a == 0])
@given(problem=problems())
@settings(max_examples=10)
def test_special_alphas_are_the_shortcuts(
    scope: Scope, only_positive: bool, problem: Problem
) -> None:
    pairs = [
        (scale_aligned_per_example(0.0, scope, only_positive), remove_aligned_per_example),
        (scale_aligned_per_example(-1.0, scope, only_positive), reverse_aligned_per_example),
    ]
    g = problem.grads
    extra = {"reference": problem.reference, "example_dots": problem.example_dots}
    for tx, shortcut in pairs:
        short = shortcut(scope, only_positive)
        out, _ = tx.update(g, tx.init(g), **extra)
        expected, _ = short.update(g, short.init(g), **extra)
        for name in g:
            assert torch.equal(out[name], expected[name])
    keep = scale_aligned_per_example(1.0, scope, only_positive)
    out, _ = keep.update(g, keep.init(g), **extra)
    expected, _ = identity().update(g, identity().init(g), **extra)
    for name in g:
        assert torch.equal(out[name], expected[name])


def test_example_dots_are_required() -> None:
    g = {"w": torch.ones(2)}
    tx = remove_aligned_per_example()
    with pytest.raises(TypeError, match="example_dots"):
        tx.update(g, tx.init(g), reference=g)


@pytest.mark.parametrize(
    "dots",
    [
        {"w": torch.ones(3)},  # a name missing
        {"w": torch.ones(3), "b": torch.ones(3), "c": torch.ones(3)},  # a name too many
        {"w": torch.ones(3), "b": torch.ones(2)},  # lengths differ
        {"w": torch.ones(3, 1), "b": torch.ones(3, 1)},  # not (example,)
        {"w": torch.ones(0), "b": torch.ones(0)},  # no example
    ],
)
def test_bad_example_dots_are_named(dots: dict[str, Tensor]) -> None:
    g = {"w": torch.ones(2), "b": torch.ones(1)}
    tx = remove_aligned_per_example()
    with pytest.raises(GradientMismatchError, match="example_dots"):
        tx.update(g, tx.init(g), reference=g, example_dots=dots)


def test_state_records_the_fraction_acted_on() -> None:
    g_i = {"w": torch.tensor([[2.0, 0.0], [1.0, 0.0], [-3.0, 1.0], [0.0, 1.0]])}
    r = {"w": torch.tensor([1.0, 0.0])}
    g = {"w": g_i["w"].mean(0)}
    tx = reverse_aligned_per_example(only_positive=True)
    out, state = tx.update(g, tx.init(g), reference=r, example_dots={"w": g_i["w"] @ r["w"]})
    assert isinstance(state, ScaleAlignedPerExampleState)
    assert float(state.acted) == 0.5
    assert float(state.coef) == pytest.approx(0.0, abs=1e-6)  # float32 mean of c_i in [-3, 2]
    assert float(state.acted_coef) == pytest.approx(0.75, rel=1e-6)
    assert_close(out["w"], g["w"] - 2 * 0.75 * r["w"])
