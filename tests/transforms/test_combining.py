from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from gradlens.transforms import (
    GradientTransform,
    IdentityState,
    ScaleAlignedState,
    StateMismatchError,
    chain,
    identity,
    remove_aligned,
    reverse_aligned,
)


def small() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = {"0.weight": torch.tensor([1.0, 2.0]), "1.weight": torch.tensor([3.0])}
    r = {"0.weight": torch.tensor([1.0, 0.0]), "1.weight": torch.tensor([1.0])}
    return g, r


class SeenState(NamedTuple):
    extra: dict


def recorder() -> GradientTransform:
    """A transform that keeps the extras it was given in its state."""

    def init(params: Mapping[str, Tensor]) -> SeenState:
        return SeenState({})

    def update(
        grads: Mapping[str, Tensor],
        state: SeenState,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], SeenState]:
        return dict(grads), SeenState({"params": params, "reference": reference, **extra})

    return GradientTransform(init, update)


def test_state_is_the_tuple_of_member_states() -> None:
    g, r = small()
    tx = chain(identity(), remove_aligned(), reverse_aligned("layer"))
    state = tx.init(g)
    assert type(state) is tuple
    assert [type(s) for s in state] == [IdentityState, ScaleAlignedState, ScaleAlignedState]
    _, new_state = tx.update(g, state, reference=r)
    assert [type(s) for s in new_state] == [type(s) for s in state]
    assert new_state[2].coef.shape == (2,)


def test_members_run_in_order() -> None:
    g, r = small()
    out, _ = chain(remove_aligned(), reverse_aligned()).update(
        g, (remove_aligned().init(g), reverse_aligned().init(g)), reference=r
    )
    expected, _ = remove_aligned().update(g, remove_aligned().init(g), reference=r)
    assert_close(out, expected)  # once removed, nothing is left to reverse


def test_reference_params_and_extras_reach_every_member() -> None:
    g, r = small()
    tx = chain(recorder(), remove_aligned(), chain(recorder()))
    _, state = tx.update(g, tx.init(g), g, reference=r, example_dots=None, step=3)
    for seen in (state[0], state[2][0]):
        assert seen.extra["reference"] is r
        assert seen.extra["params"] is g
        assert seen.extra["step"] == 3
        assert "example_dots" in seen.extra


def test_empty_chain_is_the_identity() -> None:
    g, r = small()
    out, state = chain().update(g, chain().init(g), reference=r)
    assert out == g
    assert state == ()


def test_wrong_length_is_named() -> None:
    g, r = small()
    tx = chain(identity(), remove_aligned())
    with pytest.raises(
        StateMismatchError, match=r"chain of 2 .*expected a tuple of 2 states, got a tuple of 3"
    ):
        tx.update(g, (*tx.init(g), IdentityState()), reference=r)


def test_a_member_state_in_place_of_the_tuple_is_named() -> None:
    g, r = small()
    tx = chain(remove_aligned())
    with pytest.raises(StateMismatchError, match="got ScaleAlignedState"):
        tx.update(g, remove_aligned().init(g), reference=r)


def test_wrong_member_state_names_the_index_and_the_expected_type() -> None:
    g, r = small()
    tx = chain(identity(), remove_aligned())
    swapped = tuple(reversed(tx.init(g)))
    with pytest.raises(
        StateMismatchError, match=r"chain member 0 \(identity\).*expected a IdentityState"
    ):
        tx.update(g, swapped, reference=r)
    inner_swapped = (IdentityState(), IdentityState())
    with pytest.raises(
        StateMismatchError, match=r"chain member 1 \(scale_aligned\).*ScaleAlignedState"
    ):
        tx.update(g, inner_swapped, reference=r)


def test_nested_chain_errors_name_every_level() -> None:
    g, r = small()
    tx = chain(identity(), chain(identity(), remove_aligned()))
    state = tx.init(g)
    bad = (state[0], (state[1][0], IdentityState()))
    with pytest.raises(StateMismatchError, match=r"chain member 1 \(chain\): chain member 1"):
        tx.update(g, bad, reference=r)


def test_non_transform_argument_is_named() -> None:
    with pytest.raises(TypeError, match="chain argument 1 is a function"):
        chain(identity(), remove_aligned)  # type: ignore[arg-type]
