"""``per_model``: every transform, applied to stacked models, is the transform on each model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import Tensor
from torch.testing import assert_close

from gradlens.errors import GradientMismatchError
from gradlens.transforms import (
    named_chain,
    per_model,
    remove_aligned,
    remove_random,
    scale_aligned,
    transform_records,
)
from gradlens.transforms._random import fold_in

from ._cases import CASES, Case, Problem, example_dots, problems

MODELS = 3


def stacked(problem: Problem) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """``MODELS`` different problems of ``problem``'s layout, stacked: grads, reference, dots."""
    examples = {
        n: torch.stack([g * (m + 1) + 0.1 * m for m in range(MODELS)])
        for n, g in problem.examples.items()
    }
    reference = {
        n: torch.stack([r * (1 - 0.5 * m) + 0.01 * m * (r != 0) for m in range(MODELS)])
        for n, r in problem.reference.items()
    }
    grads = {n: e.mean(1) for n, e in examples.items()}
    dots = {
        n: torch.stack(
            [example_dots({n: examples[n][m]}, {n: reference[n][m]})[n] for m in range(MODELS)]
        )
        for n in examples
    }
    return grads, reference, dots


def model(values: dict[str, Tensor], m: int) -> dict[str, Tensor]:
    return {n: v[m] for n, v in values.items()}


def with_model_key(state: object, m: int) -> object:
    """The state a lone model ``m`` starts from under per_model: its key folded with ``m``."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return state._replace(key=fold_in(state.key, m)) if "key" in state._fields else state
    if isinstance(state, dict):
        return {k: with_model_key(v, m) for k, v in state.items()}
    if isinstance(state, tuple):
        return tuple(with_model_key(v, m) for v in state)
    return state


def flat_records(state: object) -> dict[str, Tensor]:
    return {
        f"{name}/{field}": value
        for name, fields in transform_records(state).items()
        for field, value in fields.items()
    }


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
@given(problem=problems())
@settings(max_examples=3)
def test_per_model_is_the_transform_on_each_model(case: Case, problem: Problem) -> None:
    grads, reference, dots = stacked(problem)
    # Two steps against lone models, each carrying its own state.
    tx = per_model(case.make())
    state = tx.init(grads)
    lone = [case.make() for _ in range(MODELS)]
    lone_states = [with_model_key(t.init(model(grads, m)), m) for m, t in enumerate(lone)]
    for _ in range(2):
        out, state = tx.update(grads, state, reference=reference, example_dots=dots, tag="x")
        for m in range(MODELS):
            out_m, lone_states[m] = lone[m].update(
                model(grads, m), lone_states[m], reference=model(reference, m),
                example_dots=model(dots, m),
            )  # fmt: skip
            assert_close(model(out, m), out_m)
            records = flat_records(state)
            for name, value in flat_records(lone_states[m]).items():
                assert_close(records[name][m], value, atol=1e-12, rtol=1e-9)


def test_each_model_draws_its_own_random_directions() -> None:
    g = {"w": torch.ones(MODELS, 6, dtype=torch.float64)}
    r = {"w": torch.ones(MODELS, 6, dtype=torch.float64)}
    tx = per_model(named_chain(("control", remove_random(seed=0))))
    out, state = tx.update(g, tx.init(g), reference=r)
    assert state["control"].key.unique().numel() == MODELS
    assert not torch.allclose(out["w"][0], out["w"][1])


def test_state_fields_get_a_model_axis() -> None:
    g = {"0.weight": torch.zeros(4, 2, 3), "1.weight": torch.zeros(4, 5)}
    state = per_model(scale_aligned(0.5, scope="layer")).init(g)
    assert all(field.shape == (4, 2) for field in state)
    assert per_model(remove_aligned()).init(g).coef.shape == (4,)


@pytest.mark.parametrize(
    ("grads", "reference"),
    [
        ({"a": torch.zeros(3, 2), "b": torch.zeros(2, 2)}, None),
        ({"a": torch.zeros(3, 2)}, {"a": torch.zeros(2, 2)}),
    ],
)
def test_needs_one_model_axis(grads: dict, reference: dict | None) -> None:
    tx = per_model(remove_aligned())
    with pytest.raises(GradientMismatchError, match=r"model axis|one reference per model"):
        if reference is None:
            tx.init(grads)
        else:
            tx.update(grads, tx.init(grads), reference=reference)


def test_chunk_size_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    g = {"0.weight": torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)}
    r = {"0.weight": torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)}
    whole = per_model(remove_aligned())
    chunked = per_model(remove_aligned(), chunk_size=2)
    a, _ = whole.update(g, whole.init(g), reference=r)
    b, _ = chunked.update(g, chunked.init(g), reference=r)
    assert_close(a, b)
