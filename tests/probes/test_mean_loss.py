"""The batch loss must be the mean of the examples' losses: checked on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, probe_batch, probed_step
from gradlens.probes.checks import check_mean_loss, mean_loss_check, settle

VOCAB, TOKENS = 11, 8


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:  # (example, token) -> (example, token, vocab)
        return self.head(torch.tanh(self.embed(ids)))


def batch(lengths: list[int]) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, VOCAB, (len(lengths), TOKENS))
    labels = torch.randint(0, VOCAB, (len(lengths), TOKENS))
    for i, n in enumerate(lengths):
        labels[i, n:] = -100  # padding, ignored by the loss
    return ids, labels


def token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """The usual LM loss: the mean over every valid token of the batch."""
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def example_token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """Each example's mean over its own tokens, then the mean over examples."""
    each = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return ((each * mask).sum(1) / mask.sum(1)).mean()


def summed(logits: Tensor, labels: Tensor) -> Tensor:
    return example_token_mean(logits, labels) * logits.shape[0]


UNEQUAL = [8, 8, 2, 3, 8, 1]  # examples 0 and 1 alike: the old two-example check passed it


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_a_batch_token_mean_over_unequal_lengths_is_refused_by_the_probe(method: str) -> None:
    model = TinyLM().double()
    ids, labels = batch(UNEQUAL)
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="tokens of the whole batch"):
        probe_batch(model, token_mean, ids, labels, reference=ref, method=method)


def test_a_batch_token_mean_is_refused_by_the_step_before_it_steps() -> None:
    model = TinyLM().double()
    before = [p.detach().clone() for p in model.parameters()]
    ids, labels = batch(UNEQUAL)
    trait_ids, trait_labels = batch([8] * 4)
    trait = Objective(example_token_mean, trait_ids, (trait_labels,))
    with pytest.raises(ValueError, match=r"mask\.sum\(1\)"):
        probed_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            Objective(token_mean, ids, (labels,)),
            trait,
        )
    for p, q in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # exact: untouched, not recomputed


def test_a_sum_is_named_as_such() -> None:
    model = TinyLM().double()
    ids, labels = batch([8, 5, 3])
    with pytest.raises(ValueError, match="reduction='sum'"):
        probe_batch(model, summed, ids, labels, reference=dict(model.named_parameters()))


@pytest.mark.parametrize(
    ("loss", "lengths"),
    [(example_token_mean, UNEQUAL), (token_mean, [5] * 6)],
    ids=["per-example token mean", "batch token mean, equal lengths"],
)
def test_an_example_mean_steps_exactly_as_a_plain_backward(loss: object, lengths: list) -> None:
    model = TinyLM().double()
    plain = TinyLM().double()
    plain.load_state_dict(model.state_dict())
    ids, labels = batch(lengths)
    tids, tlabels = batch([8] * 4)
    probed_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        Objective(loss, ids, (labels,)),
        Objective(example_token_mean, tids, (tlabels,)),
    )
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    loss(plain(ids), labels).backward()
    opt.step()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("batch_loss", "losses"),
    [
        (2.0, [1.0, 3.0]),  # the mean: passes
        (4.0, [1.0, 3.0]),  # the sum: refused
        (2.5, [1.0, 3.0]),  # another weighting: refused
        (2.0, [1.0, _NAN]),  # finite beside a non-finite example: refused
        (_NAN, [1.0, 3.0]),  # a non-finite batch loss: check_finite reports it, not this
        (_INF, [_INF, 3.0]),
        (5.0, [1.0]),  # one example: nothing to compare
        (2.0 + 1e-9, [1.0, 3.0]),  # within the float32 rounding
    ],
)
def test_the_device_flag_is_set_exactly_where_the_check_raises(
    batch_loss: float, losses: list[float]
) -> None:
    loss, each = torch.tensor(batch_loss), torch.tensor(losses)
    try:
        check_mean_loss(loss, each)
        raised = False
    except ValueError:
        raised = True
    deferred = mean_loss_check(loss, each)
    assert bool(deferred.failed) is raised  # a flag, exact
    if raised:  # settled with another check that passes, the error is check_mean_loss's own
        passing = mean_loss_check(torch.tensor(2.0), torch.tensor([1.0, 3.0]))
        with pytest.raises(ValueError, match="the batch loss is"):
            settle([passing, deferred])
