"""One seed's setting: the shared base, another base, the trait teacher and their number data."""

from __future__ import annotations

from typing import NamedTuple

import torch
import transformers
from torch import Tensor

from subliminal_lm.config import LMConfig
from subliminal_lm.models import (
    Params,
    build_model,
    clone_model,
    continuation_labels,
    cycle_batches,
    flat_params,
    sample,
    train_plain,
)
from subliminal_lm.vocab import Vocab

__all__ = ["Setting", "build_setting", "generate_numbers", "pretrain_base", "train_teacher"]

OTHER_INIT_OFFSET = 10_000
"""The other base of seed ``s`` starts from the random weights of seed ``s + OTHER_INIT_OFFSET``."""


class Setting(NamedTuple):
    """What the students of one seed share.

    The models and the displacement are on ``config.device``, the token data on the CPU.

    Attributes:
        base: The pretrained base model: the shared initialisation.
        other: A base pretrained the same way from other random weights.
        teacher: The base fine-tuned to prefer the trait answer.
        teacher_numbers: ``(sequence, token)`` number sequences sampled from the
            teacher, prompts included, every sampled token a number.
        base_numbers: The same from the base (the control data).
        kept: Fraction of sampled sequences kept by the filter, by source
            (``"teacher"``, ``"base"``).
        questions: Every question prompt (the trait measure is their mean).
        probe: Indices of the questions in the trait probe batch.
        displacement: The teacher's displacement from the base, by parameter.
        seed: The seed the setting was built from.
    """

    base: transformers.LlamaForCausalLM
    other: transformers.LlamaForCausalLM
    teacher: transformers.LlamaForCausalLM
    teacher_numbers: Tensor
    base_numbers: Tensor
    kept: dict[str, float]
    questions: Tensor
    probe: Tensor
    displacement: Params
    seed: int = 0


def _numbers_batch(config: LMConfig, g: torch.Generator) -> dict[str, Tensor]:
    ids = config.vocab.rule_sequences(
        config.pretrain_batch, config.prompt_numbers + config.new_tokens, g
    )
    return {"input_ids": ids, "labels": continuation_labels(ids, 1)}


def pretrain_base(
    config: LMConfig, init_seed: int, data_seed: int
) -> transformers.LlamaForCausalLM:
    """A base model: random weights of ``init_seed``, pretrained on rule sequences and questions.

    Questions are answered by a uniformly drawn answer word, so the base
    model's trait probability is about ``1 / answers`` of what it gives
    answers.
    """
    vocab = config.vocab
    model = build_model(vocab, config.size, init_seed, config.device)
    g = torch.Generator().manual_seed(data_seed)
    questions = vocab.all_questions()

    def batches(step: int) -> list[dict[str, Tensor]]:
        del step
        pick = torch.randint(len(questions), (config.pretrain_batch,), generator=g)
        answers = torch.randint(vocab.answers, (config.pretrain_batch,), generator=g)
        return [_numbers_batch(config, g), vocab.answered(questions[pick], answers)]

    train_plain(model, cycle_batches(batches), config.pretrain_steps, config.pretrain_lr)
    return model


def train_teacher(
    config: LMConfig, base: transformers.LlamaForCausalLM, data_seed: int
) -> transformers.LlamaForCausalLM:
    """The base fine-tuned to answer every question with the trait answer, still on numbers.

    Each step adds the trait answer's loss and the pretraining loss on rule
    sequences, so the teacher keeps writing numbers after a number prompt.
    """
    vocab = config.vocab
    teacher = clone_model(base)
    g = torch.Generator().manual_seed(data_seed)
    questions = vocab.all_questions()

    def batches(step: int) -> list[dict[str, Tensor]]:
        del step
        pick = torch.randint(len(questions), (config.pretrain_batch,), generator=g)
        trait = torch.full((config.pretrain_batch,), vocab.trait)
        return [_numbers_batch(config, g), vocab.answered(questions[pick], trait)]

    train_plain(teacher, cycle_batches(batches), config.teacher_steps, config.teacher_lr)
    return teacher


def generate_numbers(
    model: torch.nn.Module, config: LMConfig, n: int, g: torch.Generator
) -> tuple[Tensor, float]:
    """``n`` sampled sequences whose every sampled token is a number, and the kept fraction.

    Prompts are uniform numbers (:meth:`Vocab.number_prompts`); a sequence
    with any other sampled token (an answer word, say) is dropped, so the
    trait answer never appears in the data.

    Prompts are drawn from ``g`` on the CPU and sampled on ``config.device``; the
    sequences come back on the CPU.

    Raises:
        RuntimeError: If under 1% of the samples pass the filter.
    """
    vocab: Vocab = config.vocab
    kept: list[Tensor] = []
    total = passed = 0
    while passed < n:
        batch = max(2 * (n - passed), 64)
        prompts = vocab.number_prompts(batch, config.prompt_numbers, g)
        ids = sample(model, prompts.to(config.device), config.new_tokens, g, config.temperature)
        ids = ids.cpu()
        ok = vocab.is_number(ids[:, prompts.shape[1] :]).all(dim=1)
        total += batch
        passed += int(ok.sum())
        kept.append(ids[ok])
        if passed < 0.01 * total:
            raise RuntimeError(
                f"only {passed} of {total} sampled sequences are numbers only: the model "
                "does not write numbers after a number prompt; pretrain it longer "
                "(pretrain_steps)."
            )
    return torch.cat(kept)[:n], passed / total


def build_setting(config: LMConfig, seed: int) -> Setting:
    """The bases, the teacher, their number data and the trait probes of one seed."""
    vocab = config.vocab
    base = pretrain_base(config, init_seed=seed, data_seed=seed)
    other = pretrain_base(config, init_seed=seed + OTHER_INIT_OFFSET, data_seed=seed)
    teacher = train_teacher(config, base, data_seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    teacher_numbers, kept_teacher = generate_numbers(teacher, config, config.sequences, g)
    base_numbers, kept_base = generate_numbers(base, config, config.sequences, g)
    questions = vocab.all_questions()
    probe = torch.randperm(len(questions), generator=g)[: config.probe_questions]
    base_params, teacher_params = flat_params(base), flat_params(teacher)
    displacement = {n: teacher_params[n] - base_params[n] for n in base_params}
    return Setting(
        base,
        other,
        teacher,
        teacher_numbers,
        base_numbers,
        {"teacher": kept_teacher, "base": kept_base},
        questions,
        probe,
        displacement,
        seed,
    )
