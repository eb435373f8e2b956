from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import Tensor
from torch.testing import assert_close

from gradlens.errors import GradientMismatchError
from gradlens.transforms import (
    GradientTransform,
    ScaleAlignedState,
    Scope,
    State,
    identity,
    remove_aligned,
    reverse_aligned,
    scale_aligned,
)

from ._cases import Problem, problems

SCOPES_AND_FLAGS = [(s, p) for s in ("global", "layer") for p in (False, True)]


def run(
    tx: GradientTransform, grads: dict[str, Tensor], reference: dict[str, Tensor]
) -> tuple[dict[str, Tensor], State]:
    return tx.update(grads, tx.init(grads), reference=reference)


@pytest.mark.parametrize(("scope", "only_positive"), SCOPES_AND_FLAGS)
@given(problem=problems())
@settings(max_examples=10)
def test_special_alphas_are_the_shortcuts(
    scope: Scope, only_positive: bool, problem: Problem
) -> None:
    g, r = problem.grads, problem.reference
    pairs = [
        (scale_aligned(0.0, scope, only_positive), remove_aligned(scope, only_positive)),
        (scale_aligned(-1.0, scope, only_positive), reverse_aligned(scope, only_positive)),
        (scale_aligned(1.0, scope, only_positive), identity()),
    ]
    for tx, shortcut in pairs:
        out, _ = run(tx, g, r)
        expected, _ = run(shortcut, g, r)
        for name in g:
            assert torch.equal(out[name], expected[name])


def layered() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Layer ``a`` is along the reference plus an orthogonal part; layer ``b``'s reference is 0."""
    g = {
        "a.weight": torch.tensor([[2.0, 1.0]]),
        "b.weight": torch.tensor([5.0]),
        "a.bias": torch.tensor([0.0]),
    }
    r = {
        "a.weight": torch.tensor([[1.0, 0.0]]),
        "b.weight": torch.tensor([0.0]),
        "a.bias": torch.tensor([1.0]),
    }
    return g, r


def test_layer_scope_by_hand() -> None:
    g, r = layered()
    out, state = run(remove_aligned("layer"), g, r)
    assert list(out) == ["a.weight", "b.weight", "a.bias"]  # the gradients' order
    # layer a: <g, r> = 2, ||r||^2 = 2, c = 1 -> g - r; layer b: zero reference, kept.
    assert_close(out["a.weight"], torch.tensor([[1.0, 1.0]]))
    assert_close(out["a.bias"], torch.tensor([-1.0]))
    assert_close(out["b.weight"], torch.tensor([5.0]))
    assert isinstance(state, ScaleAlignedState)
    assert_close(state.coef, torch.tensor([1.0, 0.0]))
    assert_close(state.acted, torch.tensor([1.0, 0.0]))
    assert_close(state.cosine_before, torch.tensor([2 / (5**0.5 * 2**0.5), 0.0]))
    assert_close(state.cosine_after, torch.tensor([0.0, 0.0]))


def test_global_scope_by_hand() -> None:
    g, r = layered()
    out, state = run(reverse_aligned(), g, r)
    assert_close(out["a.weight"], torch.tensor([[0.0, 1.0]]))
    assert_close(out["a.bias"], torch.tensor([-2.0]))
    assert_close(out["b.weight"], torch.tensor([5.0]))
    assert state.coef.shape == ()
    assert_close(state.coef, torch.tensor(1.0))


def test_only_positive_leaves_negative_components() -> None:
    g = {"w": torch.tensor([-1.0, 1.0])}
    r = {"w": torch.tensor([1.0, 0.0])}
    out, state = run(remove_aligned(only_positive=True), g, r)
    assert torch.equal(out["w"], g["w"])
    assert float(state.acted) == 0.0
    assert float(state.coef) == pytest.approx(-1.0, rel=1e-6)  # float32: to a few eps


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_init_is_zeros_shaped_by_scope(scope: Scope) -> None:
    g, _ = layered()
    state = scale_aligned(0.5, scope).init({n: v.half() for n, v in g.items()})
    shape = () if scope == "global" else (2,)
    for value in state:
        assert value.shape == shape
        assert value.dtype == torch.float16
        assert not value.any()


def test_reference_is_cast_to_the_gradients_dtype() -> None:
    g, r = layered()
    out, state = run(remove_aligned("layer"), g, {n: v.double() for n, v in r.items()})
    assert all(v.dtype == torch.float32 for v in out.values())
    assert state.coef.dtype == torch.float32


def test_mismatched_reference_is_named() -> None:
    g, r = layered()
    del r["a.bias"]
    with pytest.raises(GradientMismatchError, match="gradients and reference"):
        run(remove_aligned(), g, r)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"alpha": float("nan")}, "alpha"), ({"alpha": 0.0, "scope": "model"}, "scope")],
)
def test_bad_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scale_aligned(**kwargs)


def test_gradients_flow_through_the_transform() -> None:
    g = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    r = {"w": torch.tensor([1.0, 1.0])}
    out, _ = run(remove_aligned(), g, r)
    out["w"].sum().backward()  # the output is orthogonal to r = (1, 1): its sum is constant
    assert_close(g["w"].grad, torch.zeros(2))


def test_cosine_after_is_zero_when_a_parallel_gradient_is_removed() -> None:
    # A one-entry layer is always parallel to its reference: removal leaves rounding noise.
    g = {"scale": torch.tensor([0.1]), "net.weight": torch.tensor([1.0, 2.0])}
    r = {"scale": torch.tensor([0.3]), "net.weight": torch.tensor([1.0, 0.0])}
    out, state = run(remove_aligned("layer"), g, r)
    assert out["scale"].abs() <= 1e-7
    assert torch.equal(state.cosine_after, torch.zeros(2))
    assert_close(state.acted, torch.ones(2))
