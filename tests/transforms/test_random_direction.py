"""The random-direction control beyond the shared properties: its randomness."""

from __future__ import annotations

import pytest
import torch

from gradlens.transforms import RemoveRandomState, chain, remove_aligned, remove_random
from gradlens.transforms._random import fold_in, hash32, normal


def lowbias32(x: int) -> int:
    """Chris Wellons's lowbias32 in plain Python integers."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_matches_plain_integer_arithmetic() -> None:
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 987654321]
    assert hash32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]


def test_normal_draws_look_standard_normal() -> None:
    z = normal(torch.tensor(3), torch.tensor(0), 100_000, torch.float64)
    assert abs(float(z.mean())) < 0.02  # standard error 0.003
    assert abs(float(z.std()) - 1) < 0.02
    assert abs(float((z**4).mean()) - 3) < 0.1  # kurtosis of a normal
    next_draw = normal(torch.tensor(3), torch.tensor(1), 100_000, torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([z, next_draw]))[0, 1])) < 0.02


def test_fold_in_spreads_small_keys() -> None:
    keys = fold_in(torch.arange(100)[:, None], torch.arange(100)[None, :])
    assert keys.unique().numel() >= 9_990  # a 32-bit hash: a collision or two at most


def problem() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    g = {"0.weight": torch.randn(5, 4, generator=gen), "1.weight": torch.randn(3, generator=gen)}
    r = {name: torch.randn(v.shape, generator=gen) for name, v in g.items()}
    return g, r


def test_the_seed_fixes_every_direction_and_the_count_moves_them() -> None:
    g, r = problem()
    tx = remove_random(seed=5)
    first, state = tx.update(g, tx.init(g), reference=r)
    again, _ = tx.update(g, tx.init(g), reference=r)
    second, state2 = tx.update(g, state, reference=r)
    other_tx = remove_random(seed=6)
    other, _ = other_tx.update(g, other_tx.init(g), reference=r)
    assert all(torch.equal(first[n], again[n]) for n in g)
    assert not torch.allclose(first["0.weight"], second["0.weight"])
    assert not torch.allclose(first["0.weight"], other["0.weight"])
    assert int(state.count) == 1 and int(state2.count) == 2 and int(state2.key) == 5


def test_removes_the_norm_remove_aligned_removes_but_not_along_the_reference() -> None:
    g, r = problem()
    aligned, aligned_state = remove_aligned().update(g, remove_aligned().init(g), reference=r)
    tx = remove_random(seed=1)
    out, state = tx.update(g, tx.init(g), reference=r)
    flat = lambda d: torch.cat([v.reshape(-1) for v in d.values()])  # noqa: E731
    assert float((flat(out) - flat(g)).norm()) == pytest.approx(
        float((flat(aligned) - flat(g)).norm()), rel=1e-5
    )
    assert float(state.removed_norm) == pytest.approx(float((flat(out) - flat(g)).norm()), rel=1e-5)
    assert abs(float(state.cosine_after)) > 0.05  # the trait direction is still there
    assert float(aligned_state.cosine_after) == 0.0
    assert float(state.coef) == pytest.approx(float(aligned_state.coef))


def test_directions_are_isotropic_over_steps() -> None:
    # The mean removed direction over many steps tends to 0: no fixed bias.
    g = {"w": torch.zeros(8, dtype=torch.float64)}
    r = {"w": torch.ones(8, dtype=torch.float64)}
    tx = remove_random(seed=0)
    state = tx.init(g)
    total = torch.zeros(8, dtype=torch.float64)
    steps = 2000
    for _ in range(steps):
        grads = {"w": torch.full((8,), 1e-3, dtype=torch.float64)}
        out, state = tx.update(grads, state, reference=r)
        total += (grads["w"] - out["w"]) / float(state.removed_norm)
    # sign(<g, u>) u points into g's half space: its mean is along g, about
    # sqrt(2 / pi) / sqrt(8) per coordinate; the spread around it is what is tested.
    mean = total / steps
    assert torch.allclose(mean, torch.full_like(mean, float(mean.mean())), atol=0.05)


def test_state_is_checked_and_seed_validated() -> None:
    g, r = problem()
    with pytest.raises(TypeError, match="RemoveRandomState"):
        remove_random(seed=0).update(g, remove_aligned().init(g), reference=r)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            remove_random(seed=seed)  # type: ignore[arg-type]
    assert isinstance(chain(remove_random(seed=0)).init(g)[0], RemoveRandomState)


def test_layer_scope_draws_one_direction_per_layer() -> None:
    g, r = problem()
    tx = remove_random(seed=2, scope="layer")
    out, state = tx.update(g, tx.init(g), reference=r)
    assert state.removed_norm.shape == (2,)
    for k, name in enumerate(g):
        removed = (g[name] - out[name]).norm()
        expected = (g[name] * r[name]).sum().abs() / r[name].norm()
        assert float(removed) == pytest.approx(float(expected), rel=1e-5)
        assert float(state.removed_norm[k]) == pytest.approx(float(expected), rel=1e-5)
