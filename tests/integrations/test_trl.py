"""TRL's SFTTrainer is a transformers Trainer: the callback and the mixin work on it unchanged.

A tiny Llama built from a config (random weights, nothing downloaded), float64, on
pre-tokenized sequences of one length, two micro-batches per optimizer step.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens import Objective
from gradlens.integrations import TrainerProbe
from gradlens.transforms import named_chain, remove_aligned
from tests.integrations.replay import assert_rows_match, replay, row

pytest.importorskip("trl")  # the dev extra installs it; see pyproject
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer

from gradlens.integrations.hf import GradlensCallback, ProbedTrainerMixin

VOCAB, LENGTH, MICRO, ACCUMULATE, STEPS = 24, 6, 2, 2, 2

pytestmark = [
    # SFTConfig's own deprecated alias (transformers 5 warns about it, not about our arguments)
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated"),
    # Llama's RMSNorm weights take the vmap path, through sdpa (as in tests/test_docs.py)
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """What the model minimises over an accumulated batch of equal-length sequences without
    masked labels: the sum of next-token losses over num_items_in_batch (the shifted labels,
    LENGTH - 1 per example), so per example its tokens' sum over LENGTH - 1, mean-reduced
    over examples. (Over LENGTH instead, the per-example check refuses: norms differ 6/5.)"""
    flat = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    return flat / labels[:, 1:].numel()


def sequences(batch: dict[str, Tensor]) -> Objective:
    """A micro-batch for the per-example pass: its all-ones attention_mask left out."""
    assert bool((batch["attention_mask"] == 1).all())
    return Objective(token_loss, {"input_ids": batch["input_ids"]}, (batch["labels"],))


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        pad_token_id=1, eos_token_id=2, bos_token_id=3,
    )  # fmt: skip
    return LlamaForCausalLM(config).double()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="t1", eos_token="t2", unk_token="t0"
    )


def ids(n: int, seed: int) -> Tensor:
    return torch.randint(4, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def trait() -> Objective:
    x = ids(3, seed=5)
    return Objective(token_loss, {"input_ids": x}, (x,))


class Recording(ProbedTrainerMixin, SFTTrainer):
    def training_step(self, model: Any, inputs: Any, *args: Any) -> Tensor:
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args)


class RecordingSFT(SFTTrainer):
    def training_step(self, model: Any, inputs: Any, *args: Any) -> Tensor:
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args)


class Seen(TrainerCallback):
    def __init__(self, probe: TrainerProbe) -> None:
        self.probe, self.rows = probe, []

    def on_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        assert self.probe.result is not None
        self.rows.append(row(self.probe.result, self.probe.layout))


@pytest.mark.parametrize("examples", [False, True], ids=["callback", "mixin"])
def test_sft_trainer_equals_probed_step(tmp_path: Path, examples: bool) -> None:
    net = model()
    start = copy.deepcopy(net)
    before = named_chain(("remove", remove_aligned()))
    probe = TrainerProbe(trait(), before=before, output="logits")
    seen = Seen(probe)
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATE, max_steps=STEPS, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, report_to="none",
        use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        bf16=False, gradient_checkpointing=False,  # SFTConfig's defaults are True for both
    )  # fmt: skip
    data = Dataset.from_dict({"input_ids": ids(MICRO * ACCUMULATE * STEPS, seed=4).tolist()})
    common = {"model": net, "args": args, "train_dataset": data, "callbacks": [seen]}
    if examples:
        trainer = Recording(
            **common, processing_class=tokenizer(),
            gradlens=GradlensCallback(probe), examples=sequences,
        )  # fmt: skip
    else:
        trainer = RecordingSFT(**common, processing_class=tokenizer())
        GradlensCallback(probe).add_to(trainer)
    trainer.batches = []
    trainer.train()
    batches = trainer.batches
    assert all(bool((b["labels"] == b["input_ids"]).all()) for b in batches)  # nothing masked
    steps = [batches[i : i + ACCUMULATE] for i in range(0, len(batches), ACCUMULATE)]
    want = replay(
        start,
        steps,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        before=before,
        objective=sequences,
        trait_objective=trait(),
    )
    # The model's own loss (Hugging Face's ForCausalLMLoss) runs in float32 (logits.float()):
    # the trainer's gradient, and so every later step, agrees with the float64 replay to
    # float32's eps (1.2e-7) times a few, not to float64's: relative for norms and losses,
    # absolute for cosines near 0.
    checked = assert_rows_match(seen.rows, want, examples=examples, rtol=1e-6, atol=1e-6)
    assert {"cosine", "layer_cosine", "update_cosine", "transform_coef"} <= set(checked)
    for p, q in zip(net.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)  # float32 loss, as above
