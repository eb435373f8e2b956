"""The aligned transforms' outputs and records on small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from gradlens.transforms import (
    GradientTransform,
    State,
    remove_aligned,
    reverse_aligned,
    scale_aligned,
)

F64 = torch.float64


def run(
    tx: GradientTransform, grads: dict[str, Tensor], reference: dict[str, Tensor]
) -> tuple[dict[str, Tensor], State]:
    return tx.update(grads, tx.init(grads), reference=reference)


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=F64)


def exact(a: Tensor, b: Tensor) -> None:
    """Close to float64 precision (a few ulps), for values that are exact in real arithmetic."""
    assert_close(a, b.to(a.dtype), rtol=1e-14, atol=1e-15)


# g = (3, 1, 2), r = (1, 0, 1): <g, r> = 5, ||r||^2 = 2, c = 2.5, ||g|| = sqrt(14).
# The aligned part is c r = (2.5, 0, 2.5), the rest g - c r = (0.5, 1, -0.5).
G = {"w": t(3.0, 1.0, 2.0)}
R = {"w": t(1.0, 0.0, 1.0)}
REST = t(0.5, 1.0, -0.5)
ALIGNED = t(2.5, 0.0, 2.5)


@pytest.mark.parametrize("alpha", [0.0, -1.0, 0.5, 2.0, -0.25])
def test_scale_aligned_by_hand(alpha: float) -> None:
    out, state = run(scale_aligned(alpha), G, R)
    exact(out["w"], REST + alpha * ALIGNED)
    exact(state.coef, t(2.5)[0])
    exact(state.cosine_before, torch.tensor(5.0 / (math.sqrt(14.0) * math.sqrt(2.0)), dtype=F64))
    exact(state.acted, torch.tensor(1.0, dtype=F64))
    if alpha == 0.0:
        # the rest is orthogonal to r: its cosine is 0 up to float64 rounding of <g', r>,
        # 2 n eps ||g|| / ||g'|| = 6 eps sqrt(14 / 1.5) = 4e-15 at most
        assert abs(float(state.cosine_after)) <= 1e-14
    else:
        # g' = rest + alpha c r: <g', r> = 2 alpha c = 5 alpha, ||g'||^2 = 1.5 + 12.5 alpha^2
        expected = 5.0 * alpha / (math.sqrt(1.5 + 12.5 * alpha**2) * math.sqrt(2.0))
        exact(state.cosine_after, torch.tensor(expected, dtype=F64))


def test_remove_and_reverse_by_hand() -> None:
    removed, state = run(remove_aligned(), G, R)
    exact(removed["w"], REST)
    reversed_, reversed_state = run(reverse_aligned(), G, R)
    exact(reversed_["w"], REST - ALIGNED)
    exact(reversed_state.coef, t(2.5)[0])
    exact(reversed_state.cosine_after, -state.cosine_before)


def test_only_positive_leaves_a_zero_coefficient_alone() -> None:
    # g is orthogonal to r exactly (c = 0): only_positive acts only where c > 0, so it
    # records acted = 0; without only_positive it acts (and changes nothing).
    g = {"w": t(0.0, 4.0, 0.0)}
    for only_positive, acted in ((True, 0.0), (False, 1.0)):
        out, state = run(remove_aligned(only_positive=only_positive), g, R)
        exact(out["w"], g["w"])
        exact(state.coef, t(0.0)[0])
        assert float(state.acted) == acted  # a flag: exact


def test_only_positive_by_layer_with_coefficients_of_both_signs_and_zero() -> None:
    # layer a: c = 2 (acts); layer b: c = -1 (left alone); layer c: c = 0 (left alone).
    g = {"a.w": t(2.0, 1.0), "b.w": t(-1.0, 3.0), "c.w": t(0.0, 5.0)}
    r = {"a.w": t(1.0, 0.0), "b.w": t(1.0, 0.0), "c.w": t(1.0, 0.0)}
    out, state = run(reverse_aligned("layer", only_positive=True), g, r)
    exact(out["a.w"], t(-2.0, 1.0))
    exact(out["b.w"], g["b.w"])
    exact(out["c.w"], g["c.w"])
    exact(state.coef, t(2.0, -1.0, 0.0))
    assert state.acted.tolist() == [1.0, 0.0, 0.0]  # flags: exact
    out, state = run(reverse_aligned("layer"), g, r)
    exact(out["b.w"], t(1.0, 3.0))
    assert state.acted.tolist() == [1.0, 1.0, 1.0]


def test_each_layer_uses_its_own_coefficient() -> None:
    # layer a: c = 1; layer b: c = 3; layer c: zero reference, c = 0.
    g = {"a.w": t(1.0, 2.0), "b.w": t(3.0, -1.0), "c.w": t(7.0)}
    r = {"a.w": t(1.0, 0.0), "b.w": t(1.0, 0.0), "c.w": t(0.0)}
    out, state = run(remove_aligned("layer"), g, r)
    exact(out["a.w"], t(0.0, 2.0))
    exact(out["b.w"], t(0.0, -1.0))
    exact(out["c.w"], t(7.0))
    exact(state.coef, t(1.0, 3.0, 0.0))
    assert state.acted.tolist() == [1.0, 1.0, 0.0]
    # globally: <g, r> = 4, ||r||^2 = 2, c = 2 for every parameter
    out, state = run(remove_aligned(), g, r)
    exact(out["a.w"], t(-1.0, 2.0))
    exact(out["b.w"], t(1.0, -1.0))
    exact(out["c.w"], t(7.0))
    exact(state.coef, t(2.0)[0])
