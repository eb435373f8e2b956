"""Hugging Face batch dicts without glue: keyword inputs, labels at -100, exact (float64)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from gradlens import Objective, per_example_dots, probed_step
from gradlens.errors import UnsupportedModelError
from gradlens.training.losses import token_mean

# vmap has no batching rule for the CPU flash-attention kernel the default "sdpa" attention
# calls; it falls back to a loop and says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

VOCAB = 30


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=12,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


def collated(lengths: list[int]) -> dict[str, torch.Tensor]:
    """What a causal-LM data collator returns with right padding: ids, mask, labels at -100."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


LENGTHS = [8, 5, 8, 3]


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_a_batch_dict_gives_the_loops_dots(build: type) -> None:
    model = build()
    batch = collated(LENGTHS)
    del batch["attention_mask"]  # right padding, causal attention: no token attends to a pad
    train = Objective.from_batch(token_mean, batch)
    assert set(train.inputs) == {"input_ids"} and len(train.targets) == 1
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    dots, sq = per_example_dots(
        model, token_mean, train.inputs, *train.targets, reference=ref, output="logits"
    )
    for i in range(len(LENGTHS)):  # the float64 loop, each example alone and unpadded
        n = LENGTHS[i]
        alone = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits
        grads = torch.autograd.grad(
            token_mean(alone, batch["labels"][i : i + 1, :n]),
            list(model.parameters()),
            allow_unused=True,
        )
        for (name, p), g in zip(model.named_parameters(), grads, strict=True):
            g = torch.zeros_like(p) if g is None else g
            torch.testing.assert_close(dots[name][i], (g * ref[name]).sum(), atol=1e-10, rtol=1e-8)
            torch.testing.assert_close(sq[name][i], g.square().sum(), atol=1e-10, rtol=1e-8)


def test_a_probed_step_on_a_batch_dict_is_the_plain_backward_step() -> None:
    model, plain = gpt2(), gpt2()
    batch = collated(LENGTHS)
    del batch["attention_mask"]
    trait_batch = collated([6, 6])
    del trait_batch["attention_mask"]
    probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        Objective.from_batch(token_mean, batch),
        Objective.from_batch(token_mean, trait_batch),
        output="logits",
    )
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    token_mean(plain(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    opt.step()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_2d_attention_mask_on_the_vmap_path_is_refused_with_its_cause() -> None:
    model = gpt2()  # on the vmap path Hugging Face's mask code branches on a value
    batch = collated(LENGTHS)
    train = Objective.from_batch(token_mean, batch)
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="branches on a tensor's value"):
        per_example_dots(
            model,
            token_mean,
            train.inputs,
            *train.targets,
            reference=ref,
            output="logits",
            method="vmap",
        )
    # auto takes no vmap path (wpe has the broadcast form since issue 21): no refusal
    dots, _ = per_example_dots(
        model, token_mean, train.inputs, *train.targets, reference=ref, output="logits"
    )
    assert all(d.shape == (len(LENGTHS),) and bool(d.isfinite().all()) for d in dots.values())


def test_from_batch_names_a_missing_target() -> None:
    with pytest.raises(KeyError, match="targets="):
        Objective.from_batch(token_mean, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
