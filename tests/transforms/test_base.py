from __future__ import annotations

import pytest
import torch

from gradlens.errors import GradlensError
from gradlens.transforms import (
    GradientTransform,
    IdentityState,
    ScaleAlignedState,
    StateMismatchError,
    identity,
    remove_aligned,
)

from ._cases import CASES, Case


def small() -> dict[str, torch.Tensor]:
    return {"0.weight": torch.tensor([[1.0, 2.0]]), "0.bias": torch.tensor([3.0])}


def test_identity_returns_the_gradients_and_an_empty_state() -> None:
    g = small()
    tx = identity()
    state = tx.init(g)
    new_g, new_state = tx.update(g, state, reference=g)
    assert state == IdentityState() == new_state
    assert new_g == g
    assert new_g is not g


def test_a_transform_is_a_pair_of_functions() -> None:
    init, update = remove_aligned()
    assert isinstance(remove_aligned(), GradientTransform)
    assert callable(init) and callable(update)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_forgetting_the_reference_fails_loudly(case: Case) -> None:
    g = small()
    tx = case.make()
    with pytest.raises(TypeError, match="reference"):
        tx.update(g, tx.init(g), example_dots={n: torch.zeros(1) for n in g})


def test_reference_is_keyword_only() -> None:
    g = small()
    tx = remove_aligned()
    with pytest.raises(TypeError):
        tx.update(g, tx.init(g), None, g)


def test_wrong_state_names_what_was_expected() -> None:
    g = small()
    with pytest.raises(
        StateMismatchError, match="expected a ScaleAlignedState, got a IdentityState"
    ):
        remove_aligned().update(g, IdentityState(), reference=g)
    with pytest.raises(StateMismatchError, match="expected a IdentityState"):
        identity().update(g, remove_aligned().init(g), reference=g)


def test_state_mismatch_is_a_gradlens_type_error() -> None:
    assert issubclass(StateMismatchError, GradlensError)
    assert issubclass(StateMismatchError, TypeError)
    assert ScaleAlignedState._fields[:3] == ("cosine_before", "cosine_after", "coef")
