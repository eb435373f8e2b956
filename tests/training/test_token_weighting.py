"""Both token weightings, explicit and exact: per-example token means and the batch token mean.

The batch token mean is Hugging Face's own loss (``model(**batch).loss`` with
labels at -100); ``Objective.from_tokens(batch, weighting="batch")`` carries
each example's weight ``n_i / mean n`` as a target, so the probed step follows
its gradient exactly (float64) and each example's values are its term's.
Hugging Face computes that loss in float32 (``logits.float()``), so the
float64 oracle is its formula, checked against ``model(**batch).loss`` to
float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens import Objective, probe_batch, probed_step
from gradlens.training.losses import token_mean, token_weights
from gradlens.training.stacked import _check_model_means
from tests.hf import collated, gpt2, loop_grads, reference_for

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LENGTHS = [8, 8, 2, 3, 8, 1]  # examples 0 and 1 alike: a two-example check would pass
# GPT-2, not Llama: Llama's RMSNorm computes in float32 even in a float64 model, so a loss
# scaled by w_i rounds differently there; GPT-2 is float64 throughout.


def _inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def hf_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Hugging Face's causal-LM loss (``ForCausalLMLoss``) in the logits' dtype."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _hf_step(batch: dict[str, Tensor], lr: float) -> list[Tensor]:
    """The plain step: Hugging Face's loss, ``loss.backward()``, SGD."""
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    found = model(**_inputs(batch)).logits
    loss = hf_loss(found, batch["labels"])
    own = model(**batch).loss  # the model's own, in float32
    torch.testing.assert_close(loss.detach(), own.detach().double(), rtol=1e-6, atol=0.0)
    loss.backward()
    opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_weighting_steps_as_hugging_faces_own_loss(side: str) -> None:
    batch = collated(LENGTHS, side)
    model = gpt2()
    probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        Objective.from_tokens(batch, weighting="batch"),
        Objective.from_tokens(collated([5, 7], side)),
        output="logits",
    )
    for p, q in zip(model.parameters(), _hf_step(batch, 0.5), strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-12)


def test_example_weighting_is_another_step_so_the_test_above_can_fail() -> None:
    batch = collated(LENGTHS)
    model = gpt2()
    probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        Objective.from_tokens(batch),
        Objective.from_tokens(collated([5, 7])),
        output="logits",
    )
    before = [p.detach() for p in gpt2().parameters()]
    after = [p.detach() for p in model.parameters()]
    moved = torch.cat([(p - b).flatten() for p, b in zip(after, before, strict=True)])
    hf = torch.cat([(q - b).flatten() for q, b in zip(_hf_step(batch, 0.5), before, strict=True)])
    assert (moved - hf).norm() > 0.1 * hf.norm()


def test_batch_weighted_examples_carry_their_terms() -> None:
    """Example i's gradient is w_i times its token mean's; their mean is HF's loss gradient."""
    model = gpt2()
    batch = collated(LENGTHS)
    train = Objective.from_tokens(batch, weighting="batch")
    ref = reference_for(model)
    probe = probe_batch(
        model, train.loss_fn, train.inputs, *train.targets, reference=ref, output="logits"
    )
    weights = token_weights(batch["labels"])
    own = loop_grads(model, token_mean, _inputs(batch), batch["labels"])  # unweighted l_i
    loss = hf_loss(model(**_inputs(batch)).logits, batch["labels"])
    hf_grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g_hf in zip(model.named_parameters(), hf_grads, strict=True):
        want = weights * (own[name].flatten(1) @ ref[name].flatten())
        torch.testing.assert_close(probe.dots[name], want, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(probe.grad[name], g_hf, rtol=1e-8, atol=1e-10)
    for i in (0, 2):  # example i's own token mean, the model's own loss on it alone
        alone = model(**{k: v[i : i + 1] for k, v in batch.items()}).loss.detach().double()
        torch.testing.assert_close(probe.losses[i], weights[i] * alone, rtol=1e-6, atol=0.0)


def _step_with(loss: object, lengths: list[int]) -> None:
    model = gpt2()
    try:
        probed_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.5),
            Objective.from_batch(loss, collated(lengths)),
            Objective.from_tokens(collated([5, 7])),
            output="logits",
        )
    finally:
        for p, q in zip(model.parameters(), gpt2().parameters(), strict=True):
            assert torch.equal(p, q)  # refused before any step


def test_hugging_faces_flat_token_mean_is_still_refused_naming_both_weightings() -> None:
    with pytest.raises(ValueError, match=r"weighting='batch'") as found:
        _step_with(hf_loss, [8, 8, 2, 3, 8, 2])
    assert "per-example token means" in str(found.value)


def test_an_example_without_valid_tokens_under_a_flat_token_mean_is_refused() -> None:
    """Alone it is 0/0 = NaN beside a finite batch loss; a check that skipped it stepped wrongly."""
    with pytest.raises(ValueError, match=r"examples \[5\] have a non-finite loss alone"):
        _step_with(hf_loss, LENGTHS)


def test_the_stacked_check_flags_a_nan_example_beside_a_finite_loss() -> None:
    each = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 3.0]])
    with pytest.raises(ValueError, match=r"examples \[1\]"):
        _check_model_means(torch.tensor([2.0, 2.0]), each)
    _check_model_means(torch.tensor([2.0, float("nan")]), each)  # both NaN: check_finite's


def test_token_weights_average_one_and_count_valid_tokens() -> None:
    labels = collated(LENGTHS)["labels"]
    weights = token_weights(labels)
    counts = torch.tensor(LENGTHS, dtype=torch.float64) - 1  # shifted: the first predicts none
    torch.testing.assert_close(weights, counts / counts.mean())
    assert float(weights[5]) == pytest.approx(0.0, abs=1e-12)
    empty = torch.full((3, 4), -100)
    torch.testing.assert_close(token_weights(empty), torch.zeros(3, dtype=torch.float64))


def test_an_unknown_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'example'.*'batch'"):
        Objective.from_tokens(collated([3, 2]), weighting="tokens")  # type: ignore[arg-type]


def test_micro_batches_split_from_the_whole_batch_step_as_the_whole_batch() -> None:
    """Weights come from the whole batch, so accumulating its splits is its batch token mean."""
    batch = collated(LENGTHS)
    whole, parts = gpt2(), gpt2()
    train = Objective.from_tokens(batch, weighting="batch")
    trait = Objective.from_tokens(collated([5, 7]))
    micro = train.split(4)
    assert [m.targets[1].shape[0] for m in micro] == [4, 2]
    for model, objective in ((whole, train), (parts, micro)):
        probed_step(
            model, torch.optim.SGD(model.parameters(), lr=0.5), objective, trait, output="logits"
        )
    for p, q in zip(parts.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for p, q in zip(whole.parameters(), _hf_step(batch, 0.5), strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        train.split(0)
