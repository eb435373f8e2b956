"""The LM setting: vocabulary, filtered number data, a teacher that carries the trait."""

import dataclasses

import pytest
import torch

from gradlens.stats import paired_t
from subliminal_lm import LMConfig, ModelSize, Vocab, build_setting, trait_probs
from subliminal_lm.setting import Setting


def tiny_config(**changes: object) -> LMConfig:
    """A config that builds a seed's setting in seconds."""
    base = LMConfig(
        seeds=2,
        size=ModelSize(hidden=32, intermediate=64, layers=2, heads=2),
        pretrain_steps=40,
        pretrain_batch=16,
        teacher_steps=30,
        teacher_lr=3e-3,
        student_steps=3,
        student_batch=4,
        probe_questions=8,
        progress=False,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def setting() -> Setting:
    torch.set_num_threads(1)
    return build_setting(tiny_config(), seed=0)


def test_vocab_layout_and_questions() -> None:
    vocab = Vocab()
    tokens = vocab.tokens()
    assert len(tokens) == vocab.size == len(set(tokens))
    assert tokens[vocab.trait_token] == "a0" and tokens[vocab.first_number] == "0"
    questions = vocab.all_questions()
    assert questions.shape == (8 * 7 * 6, 5)  # three distinct words of eight, in order
    assert len({tuple(q.tolist()) for q in questions}) == len(questions)
    batch = vocab.answered(questions[:3], torch.tensor([0, 1, 2]))
    assert batch["input_ids"][:, -1].tolist() == [vocab.first_answer + i for i in range(3)]
    assert (batch["labels"][:, :-1] == -100).all()
    assert (batch["labels"][:, -1] == batch["input_ids"][:, -1]).all()


def test_number_data_holds_numbers_only_after_the_prompt(setting: Setting) -> None:
    config = tiny_config()
    vocab = config.vocab
    prompt = 2 + config.prompt_numbers
    for data in (setting.teacher_numbers, setting.base_numbers):
        assert data.shape == (config.sequences, prompt + config.new_tokens)
        assert vocab.is_number(data[:, 2:]).all()
        assert not (data == vocab.trait_token).any()
        assert (data[:, 0] == vocab.bos).all() and (data[:, 1] == vocab.number_cue).all()
    assert not torch.equal(setting.teacher_numbers, setting.base_numbers)
    assert 0 < setting.kept["teacher"] <= 1 and 0 < setting.kept["base"] <= 1


def test_the_teacher_carries_the_trait(setting: Setting) -> None:
    vocab = tiny_config().vocab
    base = trait_probs(setting.base, vocab, setting.questions)
    teacher = trait_probs(setting.teacher, vocab, setting.questions)
    # Per question, the teacher's trait probability exceeds the base's: the paired
    # interval over questions lies above zero ...
    diff = paired_t(teacher[:, vocab.trait], base[:, vocab.trait], dim="question")
    assert float(diff["lower"]) > 0
    # ... and on average the trait answer beats anything the base prefers among the answers.
    assert float(teacher[:, vocab.trait].mean()) > float(base.mean(0).max())


def test_the_displacement_is_teacher_minus_base(setting: Setting) -> None:
    teacher = dict(setting.teacher.named_parameters())
    for name, p in setting.base.named_parameters():
        torch.testing.assert_close(setting.displacement[name], teacher[name].detach() - p.detach())
    assert any(d.abs().max() > 0 for d in setting.displacement.values())
