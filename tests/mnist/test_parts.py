import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens.training.losses import kl_divergence
from subliminal_mnist import get_conditions, init_mlp, noise_batch
from subliminal_mnist.losses import class_cross_entropy, logit_kl


def test_initialisation_statistics_follow_one_over_sqrt_fan_in() -> None:
    net = init_mlp((784, 256, 256, 13), seed=3)
    for layer in (net[0], net[2], net[4]):
        w = layer.weight.detach()
        expected = 1.0 / math.sqrt(w.shape[1])
        # std of n iid normals: relative standard error about 1/sqrt(2n)
        tolerance = 5 * expected / math.sqrt(2 * w.numel())
        assert abs(float(w.std()) - expected) < tolerance
        assert abs(float(w.mean())) < 5 * expected / math.sqrt(w.numel())
        assert torch.count_nonzero(layer.bias) == 0


def test_same_seed_same_init_other_seed_other_init() -> None:
    a, b, c = (init_mlp((10, 5, 3), seed=s) for s in (1, 1, 2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_init_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="at least two positive widths"):
        init_mlp((784,), seed=0)


def test_distillation_loss_matches_manual_kl_over_aux_logits_only() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 13), torch.randn(6, 13)
    loss = logit_kl(10)(student, teacher[:, 10:])
    p = torch.softmax(teacher[:, 10:], -1)
    q = torch.softmax(student[:, 10:], -1)
    manual = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss, manual)
    # class logits do not enter the auxiliary loss
    changed = student.clone()
    changed[:, :10] += 5.0
    torch.testing.assert_close(logit_kl(10)(changed, teacher[:, 10:]), loss)
    # batchmean over examples only: duplicating the batch leaves the loss unchanged
    twice = logit_kl(10)(torch.cat([student, student]), torch.cat([teacher, teacher])[:, 10:])
    torch.testing.assert_close(twice, loss)


def reference_kl(logits: torch.Tensor, target: torch.Tensor) -> float:
    """``KL(softmax(target) || softmax(logits))``, batch mean, in float64 numpy."""
    a, b = logits.double().numpy(), target.double().numpy()
    log_q = a - a.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    log_p = b - b.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    p = np.exp(log_p)
    terms = np.where(p > 0, p * (np.where(p > 0, log_p, 0.0) - log_q), 0.0)
    return float(terms.sum(-1).mean())


@given(st.integers(0, 1000))
def test_kl_matches_a_reference_and_is_zero_only_for_the_same_distribution(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    # the value, and its direction: the target is p, the first argument of KL
    assert abs(float(kl_divergence(a, b)) - reference_kl(a, b)) < 1e-5
    assert abs(reference_kl(a, b) - reference_kl(b, a)) > 1e-4  # so a swap would fail above
    assert float(kl_divergence(a, b)) > 0  # distinct distributions
    shift = torch.randn(4, 1, generator=gen) * 7.0  # a per-example shift: the same softmax
    assert abs(float(kl_divergence(a, a + shift))) < 1e-6
    assert float(kl_divergence(a, a)) == 0.0


def test_kl_ignores_ruled_out_classes_and_reaches_only_the_learner() -> None:
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ruled_out = target.detach().clone()
    ruled_out[:, 0] = float("-inf")  # p = 0 there: adds 0 log 0 = 0, not NaN
    loss = kl_divergence(logits, ruled_out).detach()
    assert math.isfinite(float(loss))
    assert abs(float(loss) - reference_kl(logits.detach(), ruled_out)) < 1e-12
    kl_divergence(logits, target).backward()
    assert target.grad is None and logits.grad is not None
    assert float(logits.grad.abs().sum()) > 0


def test_trait_cross_entropy_uses_class_logits() -> None:
    out = torch.randn(5, 13, dtype=torch.float64)
    labels = torch.randint(0, 10, (5,))
    classes = out[:, :10].numpy()
    log_softmax = classes - np.log(np.exp(classes).sum(-1, keepdims=True))
    expected = -log_softmax[np.arange(5), labels.numpy()].mean()
    assert abs(float(class_cross_entropy(10)(out, labels)) - expected) < 1e-12
    # the auxiliary logits do not enter the trait loss
    changed = out.clone()
    changed[:, 10:] += torch.randn(5, 3, dtype=torch.float64) * 5.0
    loss = float(class_cross_entropy(10)(out, labels))
    assert float(class_cross_entropy(10)(changed, labels)) == loss


def test_noise_is_deterministic_uniform_and_distinct() -> None:
    a = noise_batch(0, 0, 0, 2048)
    assert torch.equal(a, noise_batch(0, 0, 0, 2048))
    assert not torch.equal(a, noise_batch(0, 0, 1, 2048))
    assert not torch.equal(a, noise_batch(1, 0, 0, 2048))
    assert not torch.equal(a, noise_batch(0, 1, 0, 2048))
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    assert abs(float(a.mean())) < 0.01  # 1.6M uniforms: standard error about 4.5e-4


def test_unknown_condition_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown conditions \['bogus'\]"):
        get_conditions(["aux", "bogus"])
