import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens.alignment.measures import alignment, example_alignment, summarize
from gradlens.errors import GradientMismatchError
from gradlens.probes.ghost import per_example_dots
from tests.models import loop_grads, loss_fn, make_case

# summarize works in float32: a sum of n terms errs by at most about n eps relative to the
# sum of their magnitudes, a sqrt or a division by half an eps.
EPS32 = torch.finfo(torch.float32).eps


def np_flat(g: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([g[n].double().numpy().reshape(-1) for n in names])


def np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@given(st.integers(0, 10_000))
def test_global_and_layer_alignment_match_direct_computation(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"l1.weight": (4, 3), "l1.bias": (4,), "l2.weight": (2, 4)}
    g_t = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    g_d = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    a = alignment(g_d, reference=g_t)
    assert a.layers == ("l1", "l2")
    layers = [["l1.weight", "l1.bias"], ["l2.weight"]]
    t, d = np_flat(g_t, list(shapes)), np_flat(g_d, list(shapes))
    expected = {
        "cosine": np_cos(t, d),
        "reference_norm": np.linalg.norm(t),
        "norm": np.linalg.norm(d),
        "projection": t @ d / (t @ t),
        "layer_cosine": [np_cos(np_flat(g_t, ns), np_flat(g_d, ns)) for ns in layers],
        "layer_reference_norm": [np.linalg.norm(np_flat(g_t, ns)) for ns in layers],
        "layer_norm": [np.linalg.norm(np_flat(g_d, ns)) for ns in layers],
        "layer_projection": [
            np_flat(g_t, ns) @ np_flat(g_d, ns) / (np_flat(g_t, ns) @ np_flat(g_t, ns))
            for ns in layers
        ],
    }
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(a, name).numpy(), value, rtol=1e-12, err_msg=name)


def test_zero_trait_gradient_gives_zero_cosine_and_the_norm_shows_it() -> None:
    g = {"w": torch.randn(3, 3)}
    a = alignment(g, reference={"w": torch.zeros(3, 3)})
    # exact by design: the zero guard selects 0.0 (and the norm of zeros is 0), nothing rounds
    assert float(a.cosine) == 0.0 and float(a.reference_norm) == 0.0
    assert float(a.projection) == 0.0
    assert not torch.isnan(a.layer_projection).any()
    np.testing.assert_allclose(
        float(a.norm), np.linalg.norm(g["w"].double().numpy()), rtol=16 * EPS32
    )


def test_alignment_by_hand_with_a_zero_layer() -> None:
    # layer "0": g = (1, 1), r = (1, 0); layer "1": g = (0, -2), r = (0, 2); layer "2": r = 0.
    # global: <g, r> = 1 - 4 = -3, ||g||^2 = 2 + 4 + 9 = 15, ||r||^2 = 1 + 4 = 5.
    f64 = torch.float64
    g = {
        "0.weight": torch.tensor([[1.0, 1.0]], dtype=f64),
        "1.weight": torch.tensor([[0.0, -2.0]], dtype=f64),
        "2.weight": torch.tensor([3.0], dtype=f64),
    }
    r = {
        "0.weight": torch.tensor([[1.0, 0.0]], dtype=f64),
        "1.weight": torch.tensor([[0.0, 2.0]], dtype=f64),
        "2.weight": torch.tensor([0.0], dtype=f64),
    }
    a = alignment(g, reference=r)
    assert a.layers == ("0", "1", "2")
    expected = {
        "cosine": -3.0 / np.sqrt(75.0),
        "norm": np.sqrt(15.0),
        "reference_norm": np.sqrt(5.0),
        "projection": -3.0 / 5.0,
        "layer_cosine": [1.0 / np.sqrt(2.0), -1.0, 0.0],
        "layer_norm": [np.sqrt(2.0), 2.0, 3.0],
        "layer_reference_norm": [1.0, 2.0, 0.0],
        "layer_projection": [1.0, -1.0, 0.0],
    }
    for name, value in expected.items():
        got = getattr(a, name).numpy()
        np.testing.assert_allclose(got, value, rtol=1e-14, atol=1e-15, err_msg=name)


def test_mismatch_raises() -> None:
    with pytest.raises(GradientMismatchError, match="gradient and reference"):
        alignment({"v": torch.zeros(2)}, reference={"w": torch.zeros(2)})


def test_example_alignment_matches_materialised_cosines() -> None:
    model, x, y = make_case("mlp", batch=8)
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    per_example = loop_grads(model, x, y)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, reference=ref)
    ea = example_alignment(dots, sq_norms, reference=ref)
    names = list(ref)
    layers = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert ea.layers == ("0", "2") and ea.layer_cosine.shape == (8, 2)
    for i in range(8):
        g_i = {n: v[i] for n, v in per_example.items()}
        g, r = np_flat(g_i, names), np_flat(ref, names)
        np.testing.assert_allclose(float(ea.cosine[i]), np_cos(g, r), rtol=1e-10)
        np.testing.assert_allclose(float(ea.dot[i]), g @ r, rtol=1e-10)
        np.testing.assert_allclose(float(ea.norm[i]), np.linalg.norm(g), rtol=1e-10)
        for k, ns in enumerate(layers):
            expected = np_cos(np_flat(g_i, ns), np_flat(ref, ns))
            np.testing.assert_allclose(float(ea.layer_cosine[i, k]), expected, rtol=1e-10)


def explicit_dots(
    examples: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``<g_i[p], r[p]>`` and ``||g_i[p]||^2`` per parameter, from materialised examples."""
    dots = {n: g.flatten(1) @ reference[n].reshape(-1) for n, g in examples.items()}
    sq_norms = {n: (g.flatten(1) ** 2).sum(dim=1) for n, g in examples.items()}
    return dots, sq_norms


@given(st.integers(0, 10_000))
def test_example_alignment_matches_float64_with_zero_examples_and_a_zero_layer(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (3, 2), "b.weight": (4,), "a.bias": (3,), "c.weight": (2, 2)}
    layers = {"a": ["a.weight", "a.bias"], "b": ["b.weight"], "c": ["c.weight"]}
    names = list(shapes)
    examples = {
        n: torch.randn(5, *s, generator=gen, dtype=torch.float64) for n, s in shapes.items()
    }
    for n in names:
        examples[n][1] = 0.0  # example 1 has a zero gradient
    examples["a.weight"][3], examples["a.bias"][3] = 0.0, 0.0  # example 3 is zero in layer a
    ref = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    ref["b.weight"] = torch.zeros(4, dtype=torch.float64)  # the reference is zero in layer b
    ea = example_alignment(*explicit_dots(examples, ref), reference=ref)
    assert ea.layers == ("a", "b", "c") and ea.layer_cosine.shape == (5, 3)
    r = np_flat(ref, names)
    for i in range(5):
        g = np_flat({n: v[i] for n, v in examples.items()}, names)
        den = np.linalg.norm(g) * np.linalg.norm(r)
        np.testing.assert_allclose(float(ea.dot[i]), g @ r, rtol=1e-12, atol=1e-12 * den)
        np.testing.assert_allclose(float(ea.norm[i]), np.linalg.norm(g), rtol=1e-12)
        cos = g @ r / den if den > 0 else 0.0
        np.testing.assert_allclose(float(ea.cosine[i]), cos, rtol=1e-12, atol=1e-12)
        for k, ns in enumerate(layers.values()):
            g_l, r_l = np_flat({n: v[i] for n, v in examples.items()}, ns), np_flat(ref, ns)
            den_l = np.linalg.norm(g_l) * np.linalg.norm(r_l)
            cos_l = g_l @ r_l / den_l if den_l > 0 else 0.0
            np.testing.assert_allclose(float(ea.layer_cosine[i, k]), cos_l, rtol=1e-12, atol=1e-12)
    # exact by design (the zero guard): a zero example, or a zero layer of either side
    assert float(ea.cosine[1]) == 0.0 and float(ea.norm[1]) == 0.0
    assert ea.layer_cosine[1].tolist() == [0.0, 0.0, 0.0]
    assert ea.layer_cosine[:, 1].tolist() == [0.0] * 5
    assert float(ea.layer_cosine[3, 0]) == 0.0


def test_zero_gradient_examples_are_not_counted_as_positive() -> None:
    # Examples 0 and 2 have zero gradients: their cosine is exactly 0 by design, and the
    # published fraction of examples aligned with the reference counts only cosines > 0.
    g_i = {"w": torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-1.0, 2.0]])}
    r = {"w": torch.tensor([1.0, 0.0])}
    ea = example_alignment(*explicit_dots(g_i, r), reference=r)
    np.testing.assert_allclose(
        ea.cosine.numpy(), [0.0, 1.0 / np.sqrt(2.0), 0.0, -1.0 / np.sqrt(5.0)], rtol=8 * EPS32
    )
    s = summarize(ea.cosine)
    np.testing.assert_allclose(float(s["frac_positive"]), 0.25, rtol=1e-7)
    np.testing.assert_allclose(
        float(s["mean"]), (1.0 / np.sqrt(2.0) - 1.0 / np.sqrt(5.0)) / 4, rtol=64 * EPS32
    )


def test_summarize_counts_exact_zeros_as_not_positive() -> None:
    values = [0.0, -0.0, 0.5, -0.25, 0.0, 2.0, -3.0, 1e-30]
    s = summarize(torch.tensor(values))
    np.testing.assert_allclose(float(s["frac_positive"]), 3 / 8, rtol=1e-7)
    np.testing.assert_allclose(float(s["mean"]), np.mean(values), rtol=64 * EPS32)
    quantiles = np.quantile(np.array(values, dtype=np.float64), [0.05, 0.25, 0.5, 0.75, 0.95])
    np.testing.assert_allclose(s["quantile"].numpy(), quantiles, rtol=8 * EPS32, atol=8 * EPS32)
    assert float(summarize(torch.zeros(6))["frac_positive"]) == 0.0  # a count: exact


def test_summarize_matches_float64_on_skewed_values() -> None:
    # Skewed, so that the mean, the median and each quantile level are all different.
    gen = np.random.default_rng(5)
    values = gen.exponential(size=101) - 0.3
    s = summarize(torch.tensor(values))
    np.testing.assert_allclose(float(s["mean"]), values.mean(), rtol=128 * EPS32)  # 101 terms
    assert abs(values.mean() - np.median(values)) > 0.1
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    np.testing.assert_allclose(
        s["quantile"].numpy(), np.quantile(values, levels), rtol=8 * EPS32, atol=8 * EPS32
    )
    np.testing.assert_allclose(float(s["frac_positive"]), (values > 0).mean(), rtol=1e-7)
    custom = summarize(torch.tensor(values), quantiles=(0.1, 0.9))
    np.testing.assert_allclose(
        custom["quantile"].numpy(), np.quantile(values, [0.1, 0.9]), rtol=8 * EPS32, atol=8 * EPS32
    )


def test_summarize_of_no_values_is_nan() -> None:
    s = summarize(torch.zeros(0))
    assert s["quantile"].shape == (5,)
    assert all(bool(torch.isnan(v).all()) for v in s.values())


def test_summarize_values() -> None:
    s = summarize(torch.tensor([-2.0, -1.0, 1.0, 2.0, 3.0]))
    assert float(s["mean"]) == pytest.approx(0.6)
    assert float(s["frac_positive"]) == pytest.approx(0.6)
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    expected = np.quantile([-2.0, -1.0, 1.0, 2.0, 3.0], levels)  # linear interpolation
    np.testing.assert_allclose(s["quantile"].numpy(), expected, rtol=1e-6)
