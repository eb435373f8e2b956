"""A Hugging Face 2-D ``attention_mask`` is exact on every path (float64 against the loop).

Under ``vmap`` the library's mask code would ask whether any token is masked
(a value-dependent branch); gradlens makes it build the full mask instead
(:mod:`gradlens.probes.masks`). BERT (bidirectional) and a Llama-style LM
(causal, rotary), left and right padding, on the ``vmap`` path and on auto.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from gradlens import Objective, per_example_dots, per_example_grads, probed_step
from gradlens.probes.masks import vmap_safe_masks
from gradlens.training.losses import token_mean
from tests.hf import bert, collated, llama, loop_grads, reference_for, transformers

# vmap has no batching rule for the CPU flash-attention kernel of the "sdpa" attention.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LENGTHS = [8, 5, 8, 3]


def _assert_dots(dots: dict, sq: dict, grads: dict, ref: dict) -> None:
    assert dots.keys() == grads.keys()
    for name, g in grads.items():
        flat = g.flatten(1)
        torch.testing.assert_close(dots[name], flat @ ref[name].flatten(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(sq[name], flat.square().sum(1), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_bert_with_a_padding_mask_gives_the_loops_dots(side: str, method: str) -> None:
    model = bert()
    batch = collated(LENGTHS, side)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = torch.tensor([0, 2, 1, 2])
    ref = reference_for(model)
    got = per_example_dots(
        model, F.cross_entropy, inputs, labels, reference=ref, method=method, output="logits"
    )
    _assert_dots(*got, loop_grads(model, F.cross_entropy, inputs, labels), ref)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_llama_with_a_padding_mask_gives_the_loops_dots(side: str, method: str) -> None:
    model = llama()
    train = Objective.from_batch(token_mean, collated(LENGTHS, side))
    assert "attention_mask" in train.inputs
    ref = reference_for(model)
    got = per_example_dots(
        model,
        token_mean,
        train.inputs,
        *train.targets,
        reference=ref,
        method=method,
        output="logits",
    )
    _assert_dots(*got, loop_grads(model, token_mean, train.inputs, *train.targets), ref)


def test_the_mask_matters_so_the_check_can_fail() -> None:
    """Without its mask a left-padded example's gradient differs: the tests above see the mask."""
    model = llama()
    batch = collated(LENGTHS, "left")
    with_mask = per_example_grads(
        model, token_mean, {k: batch[k] for k in ("input_ids", "attention_mask")},
        batch["labels"], output="logits",
    )  # fmt: skip
    without = per_example_grads(
        model, token_mean, {"input_ids": batch["input_ids"]}, batch["labels"], output="logits"
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (with_mask[name][1] - without[name][1]).abs().max() > 1e-6


def test_a_probed_step_with_a_padding_mask_is_the_plain_backward_step() -> None:
    model, plain = llama(), llama()
    batch = collated(LENGTHS, "left")
    probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        Objective.from_batch(token_mean, batch),
        Objective.from_batch(token_mean, collated([6, 4], "left")),
        method="vmap",
        output="logits",
    )
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    token_mean(plain(**inputs).logits, batch["labels"]).backward()
    opt.step()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_the_library_predicate_is_restored_after_the_block_even_on_error() -> None:
    masking_utils = transformers.masking_utils
    original = masking_utils.is_tracing
    with pytest.raises(RuntimeError, match="inside"), vmap_safe_masks():
        assert masking_utils.is_tracing is not original
        with vmap_safe_masks():  # nested: a no-op
            pass
        assert masking_utils.is_tracing is not original
        raise RuntimeError("inside")
    assert masking_utils.is_tracing is original
    x = torch.ones(2)
    with vmap_safe_masks():
        assert not masking_utils.is_tracing(x)  # outside a transform: the library's answer
        assert torch.func.vmap(lambda t: torch.tensor(masking_utils.is_tracing(t)))(x).all()


def test_a_module_loaded_inside_a_block_hides_no_mask_code_from_later_blocks() -> None:
    """The scan of loaded modules is cached; one made while patched still lists the mask code."""
    masking_utils = transformers.masking_utils
    original = masking_utils.is_tracing
    fake = types.ModuleType("transformers._gradlens_test_loaded_late")
    fake.is_tracing = original  # type: ignore[attr-defined]
    try:
        with vmap_safe_masks():
            sys.modules[fake.__name__] = fake  # loaded while the mask code holds ours
            with vmap_safe_masks():  # a new scan, inside
                assert fake.is_tracing is not original  # type: ignore[attr-defined]
        assert masking_utils.is_tracing is original and fake.is_tracing is original  # type: ignore[attr-defined]
        with vmap_safe_masks():
            assert masking_utils.is_tracing is not original
            assert fake.is_tracing is not original  # type: ignore[attr-defined]
    finally:
        del sys.modules[fake.__name__]
