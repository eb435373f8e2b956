import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens.alignment.gradops import (
    add,
    cosine,
    dot,
    flatten,
    group_by_layer,
    layer_of,
    norm,
    projection_coef,
    safe_divide,
    scale,
    sq_norm,
    sub,
    zeros_like,
)
from gradlens.errors import GradientMismatchError

SHAPES = {"a.weight": (3, 2), "a.bias": (3,), "b.weight": (2, 3)}


@st.composite
def grads(draw: st.DrawFn, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Random float64 gradients of three magnitudes; up to two of the parameters are zero."""
    seed = draw(st.integers(0, 2**31 - 1)) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    zeroed = draw(st.sets(st.sampled_from(sorted(SHAPES)), max_size=len(SHAPES) - 1))
    return {
        n: (0.0 if n in zeroed else magnitude) * torch.randn(s, generator=gen, dtype=torch.float64)
        for n, s in SHAPES.items()
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
    # Exact, not rounded: every product with a zero side is exactly 0, and the zero guard of
    # safe_divide selects 0.0. It must be exactly 0: summaries count cosines `> 0` as positive.
    assert float(cosine(a, z)) == 0.0
    assert float(cosine(z, a)) == 0.0
    assert float(cosine(z, z)) == 0.0
    assert float(projection_coef(a, reference=z)) == 0.0
    assert float(projection_coef(z, reference=a)) == 0.0
    assert float(norm(z)) == 0.0 and float(sq_norm(z)) == 0.0


# Hand-computed: two layers, a zero parameter and entries of both signs.
#   a = (3, 0, 0, 4 | 0, 0 | 12),  b = (1, -2, 0, 0 | 5, 5 | -1)
#   <a, b> = 3 - 12 = -9,  ||a|| = sqrt(9 + 16 + 144) = 13,  ||b|| = sqrt(1 + 4 + 50 + 1) = sqrt(56)
HAND_A = {
    "x.weight": torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64),
    "x.bias": torch.tensor([0.0, 0.0], dtype=torch.float64),
    "y.weight": torch.tensor([[12.0]], dtype=torch.float64),
}
HAND_B = {
    "x.weight": torch.tensor([[1.0, -2.0], [0.0, 0.0]], dtype=torch.float64),
    "x.bias": torch.tensor([5.0, 5.0], dtype=torch.float64),
    "y.weight": torch.tensor([[-1.0]], dtype=torch.float64),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_computed_values(dtype: torch.dtype) -> None:
    a = {n: v.to(dtype) for n, v in HAND_A.items()}
    b = {n: v.to(dtype) for n, v in HAND_B.items()}
    # float32: the norms go through sqrt, square, sum and sqrt again, a few eps each
    eps = torch.finfo(dtype).eps
    tol = {"rtol": 1e-12 if dtype == torch.float64 else 16 * eps, "atol": 0.0}
    expected = {
        "dot": -9.0,
        "sq_norm": 169.0,
        "norm": 13.0,
        "cosine": -9.0 / (13.0 * math.sqrt(56.0)),
        "cosine_ba": -9.0 / (13.0 * math.sqrt(56.0)),
        "projection_ab": -9.0 / 56.0,
        "projection_ba": -9.0 / 169.0,
        "self_cosine": 1.0,
        "opposite_cosine": -1.0,
    }
    got = {
        "dot": dot(a, b),
        "sq_norm": sq_norm(a),
        "norm": norm(a),
        "cosine": cosine(a, b),
        "cosine_ba": cosine(b, a),
        "projection_ab": projection_coef(a, reference=b),
        "projection_ba": projection_coef(b, reference=a),
        "self_cosine": cosine(b, b),
        "opposite_cosine": cosine(scale(a, -3.0), a),
    }
    for name, value in got.items():
        assert value.shape == () and value.dtype == dtype, name
        np.testing.assert_allclose(float(value), expected[name], err_msg=name, **tol)


def test_each_parameter_counts_once() -> None:
    # b is nonzero only in its last parameter: a dot (or a norm) that skipped parameters, or
    # counted one twice, would not give these values.
    a = dict(HAND_A)
    only_last = {n: torch.zeros_like(v) for n, v in HAND_B.items()}
    only_last["y.weight"] = torch.tensor([[2.0]], dtype=torch.float64)
    np.testing.assert_allclose(float(dot(a, only_last)), 24.0, rtol=1e-14)
    np.testing.assert_allclose(float(cosine(a, only_last)), 12.0 / 13.0, rtol=1e-14)
    np.testing.assert_allclose(float(sq_norm(only_last)), 4.0, rtol=1e-14)
    np.testing.assert_allclose(float(norm(only_last)), 2.0, rtol=1e-14)


def test_safe_divide_divides_where_nonzero_and_gives_zero_elsewhere() -> None:
    num = torch.tensor([1.0, -2.0, 0.0, 3.0, 0.0, -5.0], dtype=torch.float64)
    den = torch.tensor([2.0, 0.0, 0.0, -4.0, 7.0, 1e-300], dtype=torch.float64)
    got = safe_divide(num, den)
    assert got.dtype == torch.float64 and not got.isnan().any()
    torch.testing.assert_close(
        got,
        torch.tensor([0.5, 0.0, 0.0, -0.75, 0.0, -5e300], dtype=torch.float64),
        rtol=1e-14,
        atol=0.0,
    )
    # the zero guard gives exactly 0 (not NaN, not rounding noise) where den == 0
    assert float(got[1]) == 0.0 and float(got[2]) == 0.0
    scalar = safe_divide(torch.tensor(3.0), torch.tensor(0.0))
    assert scalar.shape == () and float(scalar) == 0.0


def test_safe_divide_has_finite_gradients_at_zero() -> None:
    num = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    den = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    safe_divide(num, den).sum().backward()
    assert num.grad is not None and den.grad is not None
    torch.testing.assert_close(num.grad, torch.tensor([0.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(den.grad, torch.tensor([0.0, -2.0 / 16.0], dtype=torch.float64))


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


def test_layers_are_module_prefixes_in_first_seen_order() -> None:
    names = ["net.0.weight", "head.weight", "net.0.bias", "net.2.weight", "scale", "head.bias"]
    assert [layer_of(n) for n in names] == ["net.0", "head", "net.0", "net.2", "scale", "head"]
    assert group_by_layer(names) == {
        "net.0": ["net.0.weight", "net.0.bias"],
        "head": ["head.weight", "head.bias"],
        "net.2": ["net.2.weight"],
        "scale": ["scale"],
    }
