from __future__ import annotations

import pytest
import torch

from gradlens.transforms import (
    chain,
    identity,
    named_chain,
    remove_aligned,
    remove_aligned_per_example,
    reverse_aligned,
    transform_records,
)


def small() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = {"0.weight": torch.tensor([1.0, 2.0]), "1.weight": torch.tensor([3.0])}
    r = {"0.weight": torch.tensor([1.0, 0.0]), "1.weight": torch.tensor([1.0])}
    return g, r


def test_a_bare_transform_is_named_after_its_state() -> None:
    g, r = small()
    tx = remove_aligned("layer")
    _, state = tx.update(g, tx.init(g), reference=r)
    records = transform_records(state)
    assert list(records) == ["scale_aligned"]
    assert sorted(records["scale_aligned"]) == ["acted", "coef", "cosine_after", "cosine_before"]
    assert torch.equal(records["scale_aligned"]["coef"], state.coef)


def test_named_chain_names_label_the_records() -> None:
    g, r = small()
    tx = named_chain(("remove", remove_aligned()), ("flip", reverse_aligned("layer")))
    _, state = tx.update(g, tx.init(g), reference=r)
    records = transform_records(state)
    assert list(records) == ["remove", "flip"]
    assert records["remove"]["coef"].shape == ()
    assert records["flip"]["coef"].shape == (2,)
    assert torch.equal(records["flip"]["coef"], state["flip"].coef)
    # each name holds its own member's values, not the other's
    for name, member in state.items():
        for field in member._fields:
            assert torch.equal(records[name][field], getattr(member, field))
    assert not torch.equal(records["remove"]["cosine_before"], torch.zeros(()))


def test_repeated_names_in_a_plain_chain_get_their_position() -> None:
    g, _ = small()
    tx = chain(identity(), remove_aligned(), chain(remove_aligned(), remove_aligned_per_example()))
    assert list(transform_records(tx.init(g))) == [
        "scale_aligned_1",
        "scale_aligned_2",
        "scale_aligned_per_example",
    ]


def test_nested_named_chains_join_names_with_a_dot() -> None:
    g, _ = small()
    tx = named_chain(("outer", named_chain(("inner", remove_aligned()))), ("id", identity()))
    assert list(transform_records(tx.init(g))) == ["outer.inner"]


def test_records_are_detached() -> None:
    g = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    r = {"w": torch.tensor([1.0, 0.0])}
    tx = remove_aligned()
    _, state = tx.update(g, tx.init(g), reference=r)
    assert state.cosine_after.requires_grad
    assert not any(v.requires_grad for v in transform_records(state)["scale_aligned"].values())


def test_identity_adds_nothing() -> None:
    assert transform_records(identity().init({})) == {}


def test_non_state_is_refused() -> None:
    with pytest.raises(TypeError, match="NamedTuple, or a tuple or dict of states"):
        transform_records([torch.zeros(())])


def test_named_chain_refuses_repeated_names_and_bad_members() -> None:
    with pytest.raises(ValueError, match="unique"):
        named_chain(("a", identity()), ("a", identity()))
    with pytest.raises(TypeError, match=r"\(name, transform\) pair"):
        named_chain(identity())  # type: ignore[arg-type]


def test_named_chain_state_mismatch_names_the_members() -> None:
    g, r = small()
    tx = named_chain(("remove", remove_aligned()))
    with pytest.raises(TypeError, match=r"keyed \['remove'\]"):
        tx.update(g, {"other": remove_aligned().init(g)}, reference=r)
