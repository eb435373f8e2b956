"""``--protocol rerun``: the public rerun's split (10,000 training images held out, 245 steps)."""

from __future__ import annotations

import mnist_aux
import pytest
import torch

from subliminal_mnist.data import (
    RERUN_HELD_OUT,
    RERUN_SPLIT_SEED,
    SPLIT_SIZES,
    Digits,
    protocol_train,
    train_size,
)
from subliminal_mnist.dispatch import PartSettings, _teacher_key
from subliminal_mnist.run import check_values


def _indexed() -> Digits:
    """A stand-in for the training split whose 'pixel' is the image's index in the file."""
    index = torch.arange(SPLIT_SIZES["train"])
    return Digits(index[:, None].float(), index % 10)


def test_the_rerun_keeps_the_50000_images_its_split_gives_in_its_order() -> None:
    train = _indexed()
    kept = protocol_train(train, "rerun").images[:, 0].long()
    # the rerun's load_splits: perm = randperm(60000, Generator().manual_seed(1234))
    perm = torch.randperm(60_000, generator=torch.Generator().manual_seed(RERUN_SPLIT_SEED))
    assert kept.shape == (50_000,) and torch.equal(kept, perm[RERUN_HELD_OUT:])
    held = perm[:RERUN_HELD_OUT]
    assert not torch.isin(held, kept).any()
    assert torch.equal(torch.sort(torch.cat([held, kept])).values, torch.arange(60_000))
    assert protocol_train(train, "original") is train and protocol_train(train) is train
    assert train_size("rerun") == 50_000 and train_size(None) == train_size("original") == 60_000


def test_unknown_protocols_and_partial_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="--protocol must be one of"):
        train_size("val")
    with pytest.raises(ValueError, match="whole training split"):
        protocol_train(Digits(torch.zeros(100, 1), torch.zeros(100, dtype=torch.long)), "rerun")


def test_the_flag_sets_the_split_and_245_steps() -> None:
    config = mnist_aux.parse(["--protocol", "rerun", "--models", "25", "--seeds", "5"])
    assert config.protocol == "rerun" and config.student.noise_per_epoch == 50_000
    assert config.student.steps_per_epoch == 49 and config.student.steps == 245
    assert mnist_aux.parse([]).protocol is None
    assert mnist_aux.parse(["--protocol", "original"]).protocol is None
    quick = mnist_aux.parse(["--protocol", "rerun", "--quick"])
    assert quick.protocol == "rerun" and quick.student.noise_per_epoch == 20 * 1024
    with pytest.raises(SystemExit):
        mnist_aux.parse(["--protocol", "val"])


def test_the_rerun_has_its_own_teachers_and_probe_range() -> None:
    original = PartSettings.from_config(mnist_aux.parse([]))
    rerun = PartSettings.from_config(mnist_aux.parse(["--protocol", "rerun"]))
    assert rerun.protocol == "rerun" and original.protocol is None
    assert _teacher_key(rerun, 0) != _teacher_key(original, 0)
    check_values(mnist_aux.parse(["--probe-size", "55000"]))
    with pytest.raises(ValueError, match=r"--probe-size must be in 1\.\.50000"):
        check_values(mnist_aux.parse(["--protocol", "rerun", "--probe-size", "55000"]))
