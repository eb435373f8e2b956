"""Hugging Face batch dicts without glue: keyword inputs, labels at -100, exact (float64)."""

from __future__ import annotations

import pytest
import torch

from gradlens import Objective, per_example_dots, probed_step
from gradlens.training.losses import token_mean
from tests.hf import collated, gpt2, llama, loop_grads, reference_for

# vmap has no batching rule for the CPU flash-attention kernel the default "sdpa" attention
# calls; it falls back to a loop and says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

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


def test_a_2d_attention_mask_on_the_vmap_path_gives_the_loops_dots() -> None:
    model = gpt2()  # every parameter on vmap, where Hugging Face's mask code would branch
    train = Objective.from_batch(token_mean, collated(LENGTHS))
    ref = reference_for(model)
    dots, _ = per_example_dots(
        model,
        token_mean,
        train.inputs,
        *train.targets,
        reference=ref,
        output="logits",
        method="vmap",
    )
    grads = loop_grads(model, token_mean, train.inputs, *train.targets)
    for name, g in grads.items():
        want = g.flatten(1) @ ref[name].flatten()
        torch.testing.assert_close(dots[name], want, rtol=1e-8, atol=1e-10)


def test_from_batch_names_a_missing_target() -> None:
    with pytest.raises(KeyError, match="targets="):
        Objective.from_batch(token_mean, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})
