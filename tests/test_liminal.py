from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradlens.liminal import liminal_loss, liminal_weight


@pytest.mark.parametrize(
    ("step", "expected"), [(0, 0.8), (5, 0.4), (10, 0.0), (11, 0.0), (1000, 0.0), (2, 0.64)]
)
def test_weight_decays_linearly_to_zero(step: int, expected: float) -> None:
    assert liminal_weight(step, lambda0=0.8, period=10) == pytest.approx(expected)


def test_weight_is_non_increasing() -> None:
    weights = [liminal_weight(s, lambda0=2.0, period=7) for s in range(12)]
    assert all(a >= b for a, b in itertools.pairwise(weights))
    assert weights[0] == 2.0 and weights[7:] == [0.0] * 5


def test_zero_lambda_is_always_zero() -> None:
    assert liminal_weight(0, lambda0=0.0, period=3) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": 0, "lambda0": -0.1, "period": 10}, "lambda0"),
        ({"step": 0, "lambda0": math.nan, "period": 10}, "lambda0"),
        ({"step": 0, "lambda0": 1.0, "period": 0}, "period"),
        ({"step": 0, "lambda0": 1.0, "period": -3}, "period"),
        ({"step": -1, "lambda0": 1.0, "period": 10}, "step"),
    ],
)
def test_weight_validates(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        liminal_weight(**kwargs)


def test_weight_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        liminal_weight(0, 1.0, 10)  # type: ignore[misc]


def manual_kl(student: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(base, dim=-1)
    q = torch.softmax(student, dim=-1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def test_loss_matches_a_manual_kl() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    base = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    loss = liminal_loss(student, base)
    assert loss.shape == ()
    torch.testing.assert_close(loss, manual_kl(student, base))
    assert loss > 0


def test_loss_is_zero_for_equal_distributions() -> None:
    logits = torch.randn(4, 3, dtype=torch.float64)
    assert liminal_loss(logits, logits.clone()).abs() < 1e-12
    assert liminal_loss(logits, logits + 7.0).abs() < 1e-12  # softmax ignores a shift


def test_loss_is_kl_from_base_to_student_not_reverse() -> None:
    student = torch.tensor([[0.0, 3.0, -1.0]], dtype=torch.float64)
    base = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(liminal_loss(student, base), manual_kl(student, base))
    assert not torch.allclose(liminal_loss(student, base), manual_kl(base, student))


def test_loss_averages_over_examples_only() -> None:
    student = torch.randn(3, 4, dtype=torch.float64)
    base = torch.randn(3, 4, dtype=torch.float64)
    per_example = [liminal_loss(student[i : i + 1], base[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(liminal_loss(student, base), torch.stack(per_example).mean())


def test_gradient_reaches_the_student_only() -> None:
    student = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    liminal_loss(student, base).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert base.grad is None


@pytest.mark.parametrize(
    ("student", "base"), [((2, 3), (2, 4)), ((2, 3, 4), (2, 3, 4)), ((3,), (3,))]
)
def test_loss_validates_shapes(student: tuple, base: tuple) -> None:
    with pytest.raises(ValueError, match=r"\(example, class\)"):
        liminal_loss(torch.zeros(student), torch.zeros(base))


def test_loss_works_under_vmap_without_warnings() -> None:
    student = torch.randn(5, 3, dtype=torch.float64)
    base = torch.randn(5, 3, dtype=torch.float64)
    per_example = torch.func.vmap(lambda s, b: liminal_loss(s[None], b[None]))(student, base)
    torch.testing.assert_close(per_example.mean(), liminal_loss(student, base))


def test_classes_ruled_out_by_the_base_add_nothing() -> None:
    student = torch.tensor([[0.5, 1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    base = torch.tensor([[1.0, 0.0, -torch.inf]], dtype=torch.float64)
    loss = liminal_loss(student, base)
    loss.backward()
    p = torch.softmax(base[:, :2], -1)
    log_q = torch.log_softmax(student.detach(), -1)[:, :2]
    torch.testing.assert_close(loss.detach(), (p * (p.log() - log_q)).sum(-1).mean())
    assert student.grad is not None and student.grad.isfinite().all()
