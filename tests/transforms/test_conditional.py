"""``conditionally_transform``: the inner transform at the chosen updates, nothing elsewhere.

The shared properties (``_cases``: ``conditional-*``) cover the updates it acts on;
these tests cover the ones it leaves alone, the counter and the records.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from gradlens.transforms import (
    ConditionalState,
    StateMismatchError,
    conditionally_transform,
    named_chain,
    per_model,
    remove_aligned,
    remove_random,
    steps_between,
    transform_records,
)


def _problem(seed: int = 0, models: int | None = None) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    lead = () if models is None else (models,)
    g = {
        "0.weight": torch.randn(*lead, 3, 2, generator=gen, dtype=torch.float64),
        "1.weight": torch.randn(*lead, 4, generator=gen, dtype=torch.float64),
    }
    r = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in g.items()}
    return g, r


@pytest.mark.parametrize(("start", "stop"), [(0, 2), (2, 4), (1, None)])
def test_acts_exactly_on_the_chosen_updates(start: int, stop: int | None) -> None:
    g, r = _problem()
    tx = conditionally_transform(remove_aligned(), steps_between(start, stop))
    plain = remove_aligned()
    state, plain_state = tx.init(g), plain.init(g)
    for step in range(5):
        acts = step >= start and (stop is None or step < stop)
        out, state = tx.update(g, state, reference=r)
        if acts:
            expected, plain_state = plain.update(g, plain_state, reference=r)
            assert_close(out, expected, rtol=0, atol=0)
        else:
            for name, value in g.items():
                assert torch.equal(out[name], value)
        assert int(state[0].step) == step + 1
        assert float(state[0].active) == float(acts)
        # the inner records are those of the last update it acted on (init's before)
        records = transform_records(state)
        assert_close(records["scale_aligned"]["coef"], plain_state.coef, rtol=0, atol=0)
        assert float(records["conditional"]["active"]) == float(acts)


def test_inner_state_advances_only_when_it_acts() -> None:
    """A random control draws its k-th direction at its k-th active update, not its k-th call."""
    g, r = _problem(1)
    tx = conditionally_transform(remove_random(3), steps_between(2, 3))
    state = tx.init(g)
    for _ in range(3):
        out, state = tx.update(g, state, reference=r)
    alone = remove_random(3)
    expected, alone_state = alone.update(g, alone.init(g), reference=r)
    assert_close(out, expected, rtol=0, atol=0)
    assert int(state[1].count) == int(alone_state.count) == 1


@pytest.mark.parametrize("vectorize", [True, False])
def test_per_model_and_named(vectorize: bool) -> None:
    models = 3
    g, r = _problem(2, models)
    tx = per_model(
        named_chain(("late", conditionally_transform(remove_aligned(), steps_between(1)))),
        vectorize=vectorize,
    )
    state = tx.init(g)
    first, state = tx.update(g, state, reference=r)
    second, state = tx.update(g, state, reference=r)
    for name, value in g.items():
        assert torch.equal(first[name], value)
    for m in range(models):
        gm = {n: v[m] for n, v in g.items()}
        rm = {n: v[m] for n, v in r.items()}
        expected, _ = remove_aligned().update(gm, remove_aligned().init(gm), reference=rm)
        assert_close({n: v[m] for n, v in second.items()}, expected)
    records = transform_records(state)
    assert sorted(records) == ["late.conditional", "late.scale_aligned"]
    assert records["late.conditional"]["active"].tolist() == [1.0] * models
    assert state["late"][0].step.tolist() == [2] * models


def test_refusals() -> None:
    g, r = _problem()
    with pytest.raises(ValueError, match="0 <= start < stop"):
        steps_between(3, 3)
    with pytest.raises(ValueError, match="0 <= start < stop"):
        steps_between(-1)
    with pytest.raises(TypeError, match="wraps a GradientTransform"):
        conditionally_transform(remove_aligned, steps_between(0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="function of the update count"):
        conditionally_transform(remove_aligned(), 3)  # type: ignore[arg-type]
    tx = conditionally_transform(remove_aligned(), steps_between(0))
    with pytest.raises(StateMismatchError, match="ConditionalState"):
        tx.update(g, remove_aligned().init(g), reference=r)
    state = tx.init(g)
    assert isinstance(state[0], ConditionalState)
