"""The trait probe sets: disjoint, fixed by the seed, held out from the test split when large."""

from __future__ import annotations

import pytest
import torch

from subliminal_mnist.blocks import trait_probes
from subliminal_mnist.data import Digits


def _digits(n: int, offset: int) -> Digits:
    """``n`` images whose single pixel is its index plus ``offset``: images name themselves."""
    index = torch.arange(n, dtype=torch.float64) + offset
    return Digits(index[:, None], torch.arange(n) % 10)


TRAIN, TEST = _digits(100, 0), _digits(20, 1000)


def _ids(images: torch.Tensor) -> set[int]:
    return {int(v) for v in images[:, 0]}


@pytest.mark.parametrize("size", [1, 17, 50])
def test_small_probes_hold_out_as_many_other_training_images(size: int) -> None:
    probes = trait_probes(TRAIN, size, seed=3, test=TEST)
    probe, held = _ids(probes.images), _ids(probes.heldout_images)
    assert len(probe) == len(held) == size
    assert not probe & held
    assert max(probe | held) < 100  # no test image
    assert probes.shuffled_labels is not None
    assert sorted(probes.shuffled_labels.tolist()) == sorted(probes.labels.tolist())


def test_a_probe_is_the_same_with_and_without_the_test_split_when_it_fits() -> None:
    a, b = trait_probes(TRAIN, 30, seed=5), trait_probes(TRAIN, 30, seed=5, test=TEST)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("size", [51, 99, 100])
def test_large_probes_hold_out_from_the_test_split(size: int) -> None:
    probes = trait_probes(TRAIN, size, seed=3, test=TEST)
    probe, held = _ids(probes.images), _ids(probes.heldout_images)
    assert len(probe) == size and max(probe) < 100
    assert len(held) == min(size, 20) and min(held) >= 1000
    labels = {int(v): int(lab) for v, lab in zip(TEST.images[:, 0], TEST.labels, strict=True)}
    assert [labels[int(v)] for v in probes.heldout_images[:, 0]] == probes.heldout_labels.tolist()


def test_the_whole_training_set_is_a_probe() -> None:
    assert _ids(trait_probes(TRAIN, 100, seed=0, test=TEST).images) == set(range(100))


@pytest.mark.parametrize(
    ("size", "test", "phrase"),
    [(0, TEST, "1..100"), (101, TEST, "1..100"), (51, None, "at most 50")],
)
def test_impossible_probe_sizes_are_refused_with_the_fix(
    size: int, test: Digits | None, phrase: str
) -> None:
    with pytest.raises(ValueError, match=phrase):
        trait_probes(TRAIN, size, seed=0, test=test)
