from __future__ import annotations

import pytest
import torch

from gradlens.transforms import (
    chain,
    identity,
    remove_aligned,
    remove_aligned_per_example,
    reverse_aligned,
    transform_records,
)


def small() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = {"0.weight": torch.tensor([1.0, 2.0]), "1.weight": torch.tensor([3.0])}
    r = {"0.weight": torch.tensor([1.0, 0.0]), "1.weight": torch.tensor([1.0])}
    return g, r


def test_single_state_is_t0() -> None:
    g, r = small()
    tx = remove_aligned("layer")
    _, state = tx.update(g, tx.init(g), reference=r)
    records = transform_records(state)
    assert sorted(records) == [
        "t0_scale_aligned_acted",
        "t0_scale_aligned_coef",
        "t0_scale_aligned_cosine_after",
        "t0_scale_aligned_cosine_before",
    ]
    assert torch.equal(records["t0_scale_aligned_coef"], state.coef)


def test_chain_of_two_has_distinct_names() -> None:
    g, r = small()
    tx = chain(remove_aligned(), reverse_aligned("layer"))
    _, state = tx.update(g, tx.init(g), reference=r)
    records = transform_records(state)
    assert len(records) == 8
    assert records["t0_scale_aligned_coef"].shape == ()
    assert records["t1_scale_aligned_coef"].shape == (2,)
    # each name holds its own member's values, not the other's
    for k, member in enumerate(state):
        for field in member._fields:
            assert torch.equal(records[f"t{k}_scale_aligned_{field}"], getattr(member, field))
    assert not torch.equal(records["t0_scale_aligned_cosine_before"], torch.zeros(()))


def test_nested_chains_are_numbered_in_run_order() -> None:
    g, _ = small()
    tx = chain(identity(), chain(remove_aligned(), chain(remove_aligned_per_example())))
    names = transform_records(tx.init(g))
    assert sorted(name for name in names if name.endswith("coef")) == [
        "t1_scale_aligned_coef",
        "t2_scale_aligned_per_example_acted_coef",
        "t2_scale_aligned_per_example_coef",
    ]
    assert not any(name.startswith("t0") for name in names)  # the identity records nothing


def test_records_are_detached() -> None:
    g = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    r = {"w": torch.tensor([1.0, 0.0])}
    tx = remove_aligned()
    _, state = tx.update(g, tx.init(g), reference=r)
    assert state.cosine_after.requires_grad
    assert not any(v.requires_grad for v in transform_records(state).values())


def test_identity_adds_nothing() -> None:
    assert transform_records(identity().init({})) == {}


def test_non_state_is_refused() -> None:
    with pytest.raises(TypeError, match="NamedTuple or a tuple of states"):
        transform_records({"coef": torch.zeros(())})
