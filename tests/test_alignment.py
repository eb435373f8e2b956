import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens import GradientMismatchError
from gradlens.alignment import alignment, example_alignment, summarize
from gradlens.ghost import per_example_dots
from gradlens.gradops import cosine, projection_coef
from tests.models import loop_grads, loss_fn, make_case


@given(st.integers(0, 10_000))
def test_global_and_layer_alignment_match_direct_computation(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"l1.weight": (4, 3), "l1.bias": (4,), "l2.weight": (2, 4)}
    g_t = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    g_d = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    a = alignment(g_d, reference=g_t)
    torch.testing.assert_close(a.cosine, cosine(g_t, g_d))
    torch.testing.assert_close(a.projection, projection_coef(g_d, reference=g_t))
    assert a.layers == ("l1", "l2")
    l1 = ["l1.weight", "l1.bias"]
    torch.testing.assert_close(
        a.layer_cosine[0], cosine({n: g_t[n] for n in l1}, {n: g_d[n] for n in l1})
    )
    torch.testing.assert_close(a.layer_reference_norm.pow(2).sum(), a.reference_norm.pow(2))


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
    for i in range(8):
        g_i = {n: v[i] for n, v in per_example.items()}
        torch.testing.assert_close(ea.cosine[i], cosine(g_i, ref))
        layer0 = ["0.weight", "0.bias"]
        expected = cosine({n: g_i[n] for n in layer0}, {n: ref[n] for n in layer0})
        torch.testing.assert_close(ea.layer_cosine[i, 0], expected)
    assert ea.layer_cosine.shape == (8, 2)


def test_summarize_values() -> None:
    s = summarize(torch.tensor([-2.0, -1.0, 1.0, 2.0, 3.0]))
    assert float(s["mean"]) == pytest.approx(0.6)
    assert float(s["frac_positive"]) == pytest.approx(0.6)
    torch.testing.assert_close(s["quantile"][2], torch.tensor(1.0))
