import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradlens.losses import kl_divergence
from gradlens.mnist import get_conditions, init_mlp, noise_batch
from gradlens.mnist.experiment import cross_seed
from gradlens.mnist.losses import class_cross_entropy, logit_kl


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


@given(st.integers(0, 1000))
def test_kl_is_nonnegative_and_zero_only_at_equality(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    assert float(kl_divergence(a, b)) > 0
    assert abs(float(kl_divergence(a, a + 7.0))) < 1e-6  # softmax is shift invariant


def test_trait_cross_entropy_uses_class_logits() -> None:
    out = torch.randn(5, 13)
    labels = torch.randint(0, 10, (5,))
    expected = torch.nn.functional.cross_entropy(out[:, :10], labels)
    torch.testing.assert_close(class_cross_entropy(10)(out, labels), expected)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_cross_init_is_a_derangement(n: int) -> None:
    seeds = list(range(n))
    partners = [cross_seed(s, seeds) for s in seeds]
    assert sorted(partners) == seeds
    assert all(p != s for p, s in zip(partners, seeds, strict=True))


def test_single_seed_cross_init_comes_from_an_unrelated_seed() -> None:
    assert cross_seed(4, [4]) not in (4,)
    with pytest.raises(ValueError, match="not among the seeds"):
        cross_seed(9, [0, 1])


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
