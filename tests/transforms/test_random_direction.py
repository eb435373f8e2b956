"""The random-direction control beyond the shared properties: its randomness."""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.errors import GradlensError
from gradlens.transforms import RemoveRandomState, chain, per_model, remove_aligned, remove_random
from gradlens.transforms._random import mix_seed


def test_seeds_are_spread_and_in_range() -> None:
    seeds = {mix_seed(key, count) for key in range(200) for count in range(200)}
    assert len(seeds) == 40_000  # no two nearby (key, count) pairs share a seed
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert mix_seed(3, 5) == mix_seed(3, 5) != mix_seed(5, 3)


def test_vmap_is_refused_with_the_fix() -> None:
    g = {"w": torch.ones(3, 4)}
    with pytest.raises(GradlensError, match=r"vectorize=False"):
        tx = per_model(remove_random(seed=0))
        tx.update(g, tx.init(g), reference=g)


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


def float32_cosine_bound(g: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """How far from 0 rounding can put the float32 cosine of ``new`` with a reference it is
    orthogonal to in exact arithmetic: ``2 n eps ||g|| / ||new||``."""
    n = sum(v.numel() for v in g.values())
    eps = torch.finfo(torch.float32).eps
    norm = lambda d: float(torch.cat([v.reshape(-1) for v in d.values()]).double().norm())  # noqa: E731
    return 2 * n * eps * norm(g) / norm(new)


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
    # remove_aligned leaves <g', r> = 0 up to float32 rounding, not exactly: a float32 dot
    # of n terms errs by at most about n eps ||g|| ||r|| (forming g' = g - c r adds as much
    # again), so the cosine of g' errs by 2 n eps ||g|| / ||g'||. Measured: 0 on an Intel
    # Xeon, 2.6e-08 on an AMD EPYC; the bound here is about 6e-06.
    assert abs(float(aligned_state.cosine_after)) <= float32_cosine_bound(g, aligned)
    assert float(state.coef) == pytest.approx(float(aligned_state.coef))


def test_directions_are_isotropic_over_models_and_steps() -> None:
    # 1000 models (per_model folds each its own key) and two steps: the mean removed
    # direction has no preferred coordinate.
    models = 1000
    g = {"w": torch.full((models, 8), 1e-3, dtype=torch.float64)}
    r = {"w": torch.ones(models, 8, dtype=torch.float64)}
    tx = per_model(remove_random(seed=0), vectorize=False)
    state = tx.init(g)
    unit = []
    for _ in range(2):
        out, state = tx.update(g, state, reference=r)
        unit.append((g["w"] - out["w"]) / state.removed_norm[:, None])
    # sign(<g, u>) u points into g's half space: its mean is E|u_1| g / |g| with
    # E|u_1| = Gamma(4) / (sqrt(pi) Gamma(4.5)) on the unit sphere of R^8, so
    # E|u_1| / sqrt(8) = 0.1029 per coordinate; each coordinate's mean has sd 0.008.
    mean = torch.cat(unit).mean(0)
    expected = math.gamma(4) / (math.sqrt(math.pi) * math.gamma(4.5)) / math.sqrt(8)
    assert torch.allclose(mean, torch.full_like(mean, expected), atol=0.03)
    assert not torch.allclose(unit[0], unit[1])


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
