"""``layer_stats`` and ``LayerStats`` against float64 references on flattened vectors.

The layers of the reference computation are written out by hand (not taken from
``group_by_layer``), so a wrong grouping fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens.alignment.layerstats import (
    GLOBAL,
    LayerStats,
    groups_for,
    layer_sq_norms,
    layer_stats,
)
from gradlens.errors import GradientMismatchError

# name -> shape, and the layers by hand. Names of a layer are interleaved with other layers'
# and nested ("net.0" and "net.2" are different layers of "net").
UNEQUAL = {
    "net.0.weight": (3, 2),
    "head.weight": (2, 3),
    "net.0.bias": (3,),
    "net.2.weight": (2, 2),
    "head.bias": (2,),
}
UNEQUAL_LAYERS = {
    "net.0": ["net.0.weight", "net.0.bias"],
    "head": ["head.weight", "head.bias"],
    "net.2": ["net.2.weight"],
}
# Every layer has two parameters: the equal-size path of the group sums.
EQUAL = {"a.weight": (2, 3), "b.weight": (4,), "a.bias": (2,), "b.bias": (1,)}
EQUAL_LAYERS = {"a": ["a.weight", "a.bias"], "b": ["b.weight", "b.bias"]}
LAYOUTS = {"unequal": (UNEQUAL, UNEQUAL_LAYERS), "equal": (EQUAL, EQUAL_LAYERS)}


def flat(values: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([values[n].double().numpy().reshape(-1) for n in names])


def expected_stats(
    g: dict[str, torch.Tensor], r: dict[str, torch.Tensor], layers: dict[str, list[str]]
) -> dict[str, np.ndarray]:
    """Per layer, in float64: dot, squared norms, norms, coefficient and cosine (0 if undefined)."""
    out: dict[str, list[float]] = {k: [] for k in ("dot", "sq", "ref_sq", "coef", "cosine")}
    for names in layers.values():
        x, y = flat(g, names), flat(r, names)
        out["dot"].append(x @ y)
        out["sq"].append(x @ x)
        out["ref_sq"].append(y @ y)
        out["coef"].append(x @ y / (y @ y) if y @ y > 0 else 0.0)
        den = np.linalg.norm(x) * np.linalg.norm(y)
        out["cosine"].append(x @ y / den if den > 0 else 0.0)
    return {k: np.array(v) for k, v in out.items()}


def check(stats: LayerStats, expected: dict[str, np.ndarray], rtol: float) -> None:
    pairs = {
        "dot": (stats.dot, expected["dot"]),
        "sq_norm": (stats.sq_norm, expected["sq"]),
        "ref_sq_norm": (stats.ref_sq_norm, expected["ref_sq"]),
        "norm": (stats.norm, np.sqrt(expected["sq"])),
        "ref_norm": (stats.ref_norm, np.sqrt(expected["ref_sq"])),
        "coef": (stats.coef, expected["coef"]),
        "cosine": (stats.cosine, expected["cosine"]),
    }
    # A dot that cancels to near 0 is only known to about rtol ||g|| ||r||, so its coefficient
    # to rtol ||g|| / ||r|| and its cosine to rtol; sums of squares do not cancel.
    norms, ref_norms = np.sqrt(expected["sq"]), np.sqrt(expected["ref_sq"])
    ratio = np.divide(norms, ref_norms, out=np.zeros_like(norms), where=ref_norms > 0)
    atol = {
        "dot": rtol * norms * ref_norms,
        "coef": rtol * ratio,
        "cosine": np.full_like(norms, rtol),
    }
    for name, (got, want) in pairs.items():
        assert got.shape == (len(stats.groups),), name
        bound = atol.get(name, np.zeros_like(norms)) + rtol * np.abs(want)
        assert (np.abs(got.double().numpy() - want) <= bound).all(), (name, got, want)


@st.composite
def gradient_pairs(
    draw: st.DrawFn, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Float64 ``g`` and ``r`` of three magnitudes; some parameters of either are zero."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pair = []
    for _ in range(2):
        magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
        zeroed = draw(st.sets(st.sampled_from(sorted(shapes))))
        pair.append(
            {
                n: (0.0 if n in zeroed else magnitude)
                * torch.randn(s, generator=gen, dtype=torch.float64)
                for n, s in shapes.items()
            }
        )
    return pair[0], pair[1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@given(data=st.data())
def test_layer_scope_matches_float64_per_layer(layout: str, data: st.DataObject) -> None:
    shapes, layers = LAYOUTS[layout]
    g, r = data.draw(gradient_pairs(shapes))
    stats = layer_stats(g, reference=r)
    assert stats.groups == tuple(layers)
    check(stats, expected_stats(g, r, layers), rtol=1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@given(data=st.data())
def test_global_scope_and_total_match_float64_over_all_parameters(
    layout: str, data: st.DataObject
) -> None:
    shapes, layers = LAYOUTS[layout]
    g, r = data.draw(gradient_pairs(shapes))
    everything = {GLOBAL: [n for names in layers.values() for n in names]}
    expected = expected_stats(g, r, everything)
    total = layer_stats(g, reference=r).total()
    assert isinstance(total, LayerStats) and total.groups == (GLOBAL,)
    check(total, expected, rtol=1e-12)
    whole = layer_stats(g, reference=r, scope="global")
    assert whole.groups == (GLOBAL,)
    check(whole, expected, rtol=1e-12)


def test_hand_computed_layers_with_zeros() -> None:
    # layer a: g = (1, 2 | 3), r = (2, 0 | -1): <g, r> = -1, ||g||^2 = 14, ||r||^2 = 5
    # layer b: g = 0:  <g, r> = 0, ||g||^2 = 0, ||r||^2 = 2  -> coef 0, cosine 0
    # layer c: r = 0:  <g, r> = 0, ||g||^2 = 2, ||r||^2 = 0  -> coef 0, cosine 0
    # all: <g, r> = -1, ||g||^2 = 16, ||r||^2 = 7
    f64 = torch.float64
    g = {
        "a.weight": torch.tensor([[1.0, 2.0]], dtype=f64),
        "b.weight": torch.tensor([0.0, 0.0], dtype=f64),
        "a.bias": torch.tensor([3.0], dtype=f64),
        "c.weight": torch.tensor([1.0, -1.0], dtype=f64),
    }
    r = {
        "a.weight": torch.tensor([[2.0, 0.0]], dtype=f64),
        "b.weight": torch.tensor([1.0, 1.0], dtype=f64),
        "a.bias": torch.tensor([-1.0], dtype=f64),
        "c.weight": torch.tensor([0.0, 0.0], dtype=f64),
    }
    stats = layer_stats(g, reference=r)
    assert stats.groups == ("a", "b", "c")
    want = {
        "dot": [-1.0, 0.0, 0.0],
        "sq_norm": [14.0, 0.0, 2.0],
        "ref_sq_norm": [5.0, 2.0, 0.0],
        "norm": [math.sqrt(14.0), 0.0, math.sqrt(2.0)],
        "ref_norm": [math.sqrt(5.0), math.sqrt(2.0), 0.0],
        "coef": [-0.2, 0.0, 0.0],
        "cosine": [-1.0 / math.sqrt(70.0), 0.0, 0.0],
    }
    for name, values in want.items():
        np.testing.assert_allclose(getattr(stats, name).numpy(), values, rtol=1e-14, err_msg=name)
    # a zero side gives exactly 0 by design (the guard selects it), never NaN or noise
    assert stats.cosine[1:].tolist() == [0.0, 0.0] and stats.coef[1:].tolist() == [0.0, 0.0]
    total = stats.total()
    np.testing.assert_allclose(
        [float(total.dot[0]), float(total.sq_norm[0]), float(total.ref_sq_norm[0])],
        [-1.0, 16.0, 7.0],
        rtol=1e-14,
    )
    np.testing.assert_allclose(float(total.coef[0]), -1.0 / 7.0, rtol=1e-14)
    np.testing.assert_allclose(float(total.cosine[0]), -1.0 / math.sqrt(112.0), rtol=1e-14)


def test_ref_sq_norm_given_is_the_one_used() -> None:
    g = {"a.weight": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    r = {"a.weight": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    first = layer_stats(g, reference=r)
    again = layer_stats(g, reference=r, ref_sq_norm=first.ref_sq_norm)
    np.testing.assert_allclose(again.coef.numpy(), [11.0 / 25.0], rtol=1e-14)
    np.testing.assert_allclose(again.cosine.numpy(), [11.0 / (5.0 * math.sqrt(5.0))], rtol=1e-14)
    # it is taken as given, not recomputed: four times ||r||^2 gives a quarter of the coefficient
    scaled = layer_stats(g, reference=r, ref_sq_norm=4 * first.ref_sq_norm)
    np.testing.assert_allclose(scaled.coef.numpy(), [11.0 / 100.0], rtol=1e-14)


def test_float32_gradients_keep_their_dtype_and_match_float64_to_float32_precision() -> None:
    gen = torch.Generator().manual_seed(3)
    g = {n: torch.randn(s, generator=gen) for n, s in UNEQUAL.items()}
    r = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in UNEQUAL.items()}
    stats = layer_stats(g, reference=r)
    assert all(v.dtype == torch.float32 for v in (stats.dot, stats.sq_norm, stats.ref_sq_norm))
    # r is cast to float32 first; each sum has at most 6 terms: 1e-5 covers float32 rounding
    r32 = {n: v.float() for n, v in r.items()}
    check(stats, expected_stats(g, r32, UNEQUAL_LAYERS), rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layer_sq_norms_match_float64(layout: str) -> None:
    shapes, layers = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(4)
    g = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    want = [flat(g, names) @ flat(g, names) for names in layers.values()]
    np.testing.assert_allclose(layer_sq_norms(g).numpy(), want, rtol=1e-13)
    np.testing.assert_allclose(layer_sq_norms(g, "global").numpy(), [sum(want)], rtol=1e-13)


def test_groups_for_scopes_and_errors() -> None:
    names = list(UNEQUAL)
    assert groups_for(names, "layer") == UNEQUAL_LAYERS
    assert groups_for(names, "global") == {GLOBAL: names}
    with pytest.raises(ValueError, match="scope"):
        groups_for(names, "model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        groups_for([], "layer")


def test_mismatched_reference_raises() -> None:
    with pytest.raises(GradientMismatchError, match="gradient and reference"):
        layer_stats({"a.w": torch.zeros(2)}, reference={"a.w": torch.zeros(3)})
