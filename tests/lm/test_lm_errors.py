"""The LM experiment's refusals: each says what went wrong and what to do (docs/errors.md)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from subliminal_lm import COMBINED, get_conditions, main
from subliminal_lm.setting import generate_numbers

from .test_lm_setting import tiny_config


class AnswersOnly(nn.Module):
    """A stand-in LM that always writes the trait answer: no sample passes the number filter."""

    def __init__(self, vocab_size: int, token: int) -> None:
        super().__init__()
        self.vocab_size, self.token = vocab_size, token

    def forward(self, input_ids: Tensor, cache: object = None, use_cache: bool = False) -> object:
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.token] = 50.0
        return SimpleNamespace(logits=logits, cache=None)


def test_a_model_that_writes_no_numbers_is_refused() -> None:
    config = tiny_config()
    model = AnswersOnly(config.vocab.size, config.vocab.trait_token)
    with pytest.raises(RuntimeError, match=r"numbers only.*pretrain it longer"):
        generate_numbers(model, config, 10, torch.Generator().manual_seed(0))


def test_unknown_or_repeated_conditions_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown conditions \['adamw'\]; choose from"):
        get_conditions(["same_init", "adamw"])
    with pytest.raises(ValueError, match="listed twice"):
        get_conditions(["sgd", "sgd"])


def test_an_existing_run_file_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / COMBINED).write_text("earlier results")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(tiny_config(out=tmp_path))
    assert (tmp_path / COMBINED).read_text() == "earlier results"
