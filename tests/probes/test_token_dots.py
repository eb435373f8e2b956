"""Token-level alignment: ``d_{i,t} = <grad l_{i,t}, r>`` against a float64 per-token loop.

Each token's loss term of each example alone is differentiated by
``torch.autograd.grad`` and dotted with the reference; ``token_dots`` gives all
of them from one forward-mode pass. Their sum over tokens is the probes'
per-example dot.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gradlens import per_example_dots
from gradlens.errors import GradientMismatchError, UnsupportedModelError
from gradlens.probes import token_dots
from gradlens.training.losses import token_losses, token_mean, token_weights
from tests.hf import collated, gpt2, llama, reference_for

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LENGTHS = [8, 5, 8, 3]


def loop_token_dots(
    model: nn.Module, batch: dict[str, Tensor], ref: dict[str, Tensor], weights: Tensor | None
) -> Tensor:
    """Every (example, token): ``autograd.grad`` of that token's term alone, dotted with ``ref``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
        w = None if weights is None else weights[i : i + 1]
        terms = token_losses(model(**row).logits, batch["labels"][i : i + 1], w)[0]
        dots = []
        for t in range(terms.shape[0]):
            grads = torch.autograd.grad(
                terms[t], [p for _, p in named], retain_graph=True, allow_unused=True
            )
            pairs = zip(named, grads, strict=True)
            dots.append(
                torch.stack([(g * ref[n]).sum() for (n, _), g in pairs if g is not None]).sum()
            )
        rows.append(torch.stack(dots))
    return torch.stack(rows)


@pytest.mark.parametrize("weighting", ["example", "batch"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_token_dots_are_the_per_token_loops(side: str, weighting: str) -> None:
    model = gpt2()
    batch = collated(LENGTHS, side)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    weights = token_weights(batch["labels"]) if weighting == "batch" else None
    targets = (batch["labels"],) if weights is None else (batch["labels"], weights)
    ref = reference_for(model)
    got = token_dots(model, token_losses, inputs, *targets, reference=ref, output="logits")
    want = loop_token_dots(model, batch, ref, weights)
    assert got.shape == batch["input_ids"].shape
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert (got[batch["labels"] == -100].abs() < 1e-14).all()  # ignored tokens add nothing
    # their sum over tokens is the probes' per-example dot (ghost and vmap paths)
    dots, _ = per_example_dots(model, token_mean, inputs, *targets, reference=ref, output="logits")
    total = torch.stack(list(dots.values())).sum(0)
    torch.testing.assert_close(got.sum(1), total, rtol=1e-8, atol=1e-10)


def test_llama_token_dots_with_a_left_padding_mask() -> None:
    """Llama's RMSNorm computes in float32 even in a float64 model, so forward and reverse
    mode round differently there: the values agree to float32 rounding, not float64's."""
    model = llama()
    batch = collated(LENGTHS, "left")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = reference_for(model)
    got = token_dots(model, token_losses, inputs, batch["labels"], reference=ref, output="logits")
    want = loop_token_dots(model, batch, ref, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert want.abs().max() > 1e-2  # not a comparison of zeros


def test_chunks_give_the_same_values() -> None:
    model = gpt2()
    batch = collated(LENGTHS)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = reference_for(model)
    whole = token_dots(model, token_losses, inputs, batch["labels"], reference=ref, output="logits")
    parts = token_dots(
        model, token_losses, inputs, batch["labels"], reference=ref, output="logits", chunk_size=3
    )
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)


def test_a_scalar_loss_is_refused_naming_token_losses() -> None:
    model = gpt2()
    batch = collated([4, 3])
    with pytest.raises(ValueError, match="token_losses"):
        token_dots(
            model, token_mean, {"input_ids": batch["input_ids"]}, batch["labels"],
            reference=reference_for(model), output="logits",
        )  # fmt: skip


def test_dropout_in_training_mode_and_a_wrong_reference_are_refused() -> None:
    model = gpt2()
    batch = collated([4, 3])
    ids = {"input_ids": batch["input_ids"]}
    ref = reference_for(model)
    with pytest.raises(GradientMismatchError):
        token_dots(
            model, token_losses, ids, batch["labels"], reference=dict(list(ref.items())[1:]),
            output="logits",
        )  # fmt: skip
    model.train()
    with pytest.raises(UnsupportedModelError, match=r"[Dd]ropout"):
        token_dots(model, token_losses, ids, batch["labels"], reference=ref, output="logits")


def test_an_empty_batch_has_no_token_dots() -> None:
    model = gpt2()
    empty = torch.zeros(0, 5, dtype=torch.long)
    got = token_dots(
        model, token_losses, {"input_ids": empty}, empty, reference=reference_for(model),
        output="logits",
    )  # fmt: skip
    assert got.shape == (0, 0)
