import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens import GradientMismatchError
from gradlens.alignment import alignment, example_alignment, summarize
from gradlens.ghost import per_example_dots
from tests.models import loop_grads, loss_fn, make_case


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
    assert float(a.cosine) == 0.0 and float(a.reference_norm) == 0.0
    assert not torch.isnan(a.layer_projection).any()


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


def test_summarize_values() -> None:
    s = summarize(torch.tensor([-2.0, -1.0, 1.0, 2.0, 3.0]))
    assert float(s["mean"]) == pytest.approx(0.6)
    assert float(s["frac_positive"]) == pytest.approx(0.6)
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    expected = np.quantile([-2.0, -1.0, 1.0, 2.0, 3.0], levels)  # linear interpolation
    np.testing.assert_allclose(s["quantile"].numpy(), expected, rtol=1e-6)
