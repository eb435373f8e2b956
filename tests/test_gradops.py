import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens import GradientMismatchError
from gradlens.gradops import (
    add,
    cosine,
    dot,
    flatten,
    group_by_layer,
    norm,
    projection_coef,
    scale,
    sub,
    zeros_like,
)

SHAPES = {"a.weight": (3, 2), "a.bias": (3,), "b.weight": (2, 3)}


@st.composite
def grads(draw: st.DrawFn, seed: int | None = None) -> dict[str, torch.Tensor]:
    seed = draw(st.integers(0, 2**31 - 1)) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return {
        n: magnitude * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()
    }


@given(grads(), grads())
def test_cosine_is_bounded_and_symmetric(a: dict, b: dict) -> None:
    c = cosine(a, b)
    assert -1.0 - 1e-12 <= float(c) <= 1.0 + 1e-12
    assert math.isclose(float(c), float(cosine(b, a)), rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(float(cosine(a, a)), 1.0, rel_tol=1e-12)


@given(grads(), grads(), st.floats(0.01, 100.0))
def test_cosine_is_scale_invariant_and_flips_with_sign(a: dict, b: dict, alpha: float) -> None:
    assert math.isclose(float(cosine(scale(a, alpha), b)), float(cosine(a, b)), abs_tol=1e-12)
    assert math.isclose(float(cosine(scale(a, -alpha), b)), -float(cosine(a, b)), abs_tol=1e-12)


@given(grads(), grads())
def test_projection_leaves_an_orthogonal_residual(g: dict, r: dict) -> None:
    c = projection_coef(g, reference=r)
    residual = sub(g, scale(r, c))
    assert abs(float(dot(residual, r))) <= 1e-9 * float(norm(g) * norm(r))
    torch.testing.assert_close(add(residual, scale(r, c)), g)
    assert float(norm(residual)) <= float(norm(g)) * (1 + 1e-12)


@given(grads(), grads())
def test_dot_norm_cosine_and_projection_equal_flattened_float64(a: dict, b: dict) -> None:
    x = np.concatenate([v.numpy().reshape(-1) for v in a.values()])
    y = np.concatenate([v.numpy().reshape(-1) for v in b.values()])
    np.testing.assert_allclose(flatten(a).numpy(), x)
    np.testing.assert_allclose(float(dot(a, b)), x @ y, rtol=1e-12)
    np.testing.assert_allclose(float(norm(a)), np.linalg.norm(x), rtol=1e-12)
    cos = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    np.testing.assert_allclose(float(cosine(a, b)), cos, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(float(projection_coef(a, reference=b)), x @ y / (y @ y), rtol=1e-10)


def test_zero_norm_gives_zero_cosine_and_projection_without_warning() -> None:
    a = {n: torch.randn(s) for n, s in SHAPES.items()}
    z = zeros_like(a)
    assert float(cosine(a, z)) == 0.0
    assert float(cosine(z, z)) == 0.0
    assert float(projection_coef(a, reference=z)) == 0.0
    assert not torch.isnan(cosine(z, a))


def test_mismatched_keys_and_shapes_raise_naming_them() -> None:
    a = {n: torch.randn(s) for n, s in SHAPES.items()}
    b = dict(a)
    del b["a.bias"]
    with pytest.raises(GradientMismatchError, match=r"only in the first \['a.bias'\]"):
        dot(a, b)
    b = dict(a, **{"a.bias": torch.zeros(4)})
    with pytest.raises(GradientMismatchError, match=r"'a.bias': \(3,\) against \(4,\)"):
        add(a, b)


def test_flatten_batch_and_group_by_layer() -> None:
    per_example = {n: torch.randn(4, *s) for n, s in SHAPES.items()}
    assert flatten(per_example, batch=True).shape == (4, 6 + 3 + 6)
    assert group_by_layer(SHAPES) == {"a": ["a.weight", "a.bias"], "b": ["b.weight"]}
