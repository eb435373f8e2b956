from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradlens.training.liminal import (
    LIMINAL_SCHEDULES,
    liminal_loss,
    liminal_schedule,
    liminal_weight,
)


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
    loss = liminal_loss(student, base, temperature=1.0)
    assert loss.shape == ()
    torch.testing.assert_close(loss, manual_kl(student, base))
    assert loss > 0


def test_loss_is_zero_for_equal_distributions() -> None:
    logits = torch.randn(4, 3, dtype=torch.float64)
    assert liminal_loss(logits, logits.clone(), temperature=1.0).abs() < 1e-12
    assert (
        liminal_loss(logits, logits + 7.0, temperature=1.0).abs() < 1e-12
    )  # softmax ignores a shift


def test_loss_is_kl_from_base_to_student_not_reverse() -> None:
    student = torch.tensor([[0.0, 3.0, -1.0]], dtype=torch.float64)
    base = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        liminal_loss(student, base, temperature=1.0), manual_kl(student, base)
    )
    assert not torch.allclose(
        liminal_loss(student, base, temperature=1.0), manual_kl(base, student)
    )


def test_loss_averages_over_examples_only() -> None:
    student = torch.randn(3, 4, dtype=torch.float64)
    base = torch.randn(3, 4, dtype=torch.float64)
    per_example = [
        liminal_loss(student[i : i + 1], base[i : i + 1], temperature=1.0) for i in range(3)
    ]
    torch.testing.assert_close(
        liminal_loss(student, base, temperature=1.0), torch.stack(per_example).mean()
    )


def test_gradient_reaches_the_student_only() -> None:
    student = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    liminal_loss(student, base, temperature=1.0).backward()
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
    per_example = torch.func.vmap(lambda s, b: liminal_loss(s[None], b[None], temperature=1.0))(
        student, base
    )
    torch.testing.assert_close(per_example.mean(), liminal_loss(student, base, temperature=1.0))


def test_classes_ruled_out_by_the_base_add_nothing() -> None:
    student = torch.tensor([[0.5, 1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    base = torch.tensor([[1.0, 0.0, -torch.inf]], dtype=torch.float64)
    loss = liminal_loss(student, base, temperature=1.0)
    loss.backward()
    p = torch.softmax(base[:, :2], -1)
    log_q = torch.log_softmax(student.detach(), -1)[:, :2]
    torch.testing.assert_close(loss.detach(), (p * (p.log() - log_q)).sum(-1).mean())
    assert student.grad is not None and student.grad.isfinite().all()


# The published schedules (BrendanGho/liminal-training b71ab9a, get_lambda_kl), at their
# breakpoints, by hand: 5 epochs of 10 optimizer steps, lambda_0 = 0.4.
# liminal: t = step / 50, tau_2 = 1 / 5; t <= tau_2: 0.4 + 0.6 t / tau_2;
# t <= 1: 1 - (t - tau_2) / (1 - tau_2); else 0.
PUBLISHED = {
    "liminal": [(0, 0.4), (5, 0.7), (10, 1.0), (11, 0.975), (30, 0.5), (49, 0.025), (50, 0.0),
                (51, 0.0)],
    "constant": [(0, 0.4), (10, 0.4), (49, 0.4), (80, 0.4)],
    "pos_anneal": [(0, 0.0), (25, 0.2), (49, 0.392), (50, 0.4)],
    "neg_anneal": [(0, 0.4), (25, 0.2), (49, 0.008), (50, 0.0), (60, 0.0)],
    "anchor": [(0, 0.4), (9, 0.4), (10, 0.0), (49, 0.0)],
    "end_anchor": [(0, 0.0), (39, 0.0), (40, 0.4), (49, 0.4)],
    "early_decay": [(0, 0.4), (5, 0.2), (10, 0.0), (20, 0.0)],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [(name, step, value) for name, points in PUBLISHED.items() for step, value in points],
)
def test_schedules_match_the_published_code(name: str, step: int, expected: float) -> None:
    value = liminal_schedule(name, step=step, steps_per_epoch=10, total_steps=50, lambda_0=0.4)
    assert value == pytest.approx(expected, abs=1e-12)


def test_every_schedule_is_tested_and_names_ignore_case() -> None:
    assert set(PUBLISHED) == set(LIMINAL_SCHEDULES)
    kw = {"step": 3, "steps_per_epoch": 10, "total_steps": 50, "lambda_0": 0.4}
    for name in LIMINAL_SCHEDULES:
        assert liminal_schedule(name.upper(), **kw) == liminal_schedule(name, **kw)


def test_liminal_default_is_published_lambda_0_of_one() -> None:
    # lambda_0 = 1: phase 1 is flat at 1, then 1 -> 0 over epochs 2 to 5.
    kw = {"steps_per_epoch": 10, "total_steps": 50}
    assert [liminal_schedule("liminal", step=s, **kw) for s in (0, 5, 10, 30)] == [
        1.0, 1.0, 1.0, 0.5
    ]  # fmt: skip


def test_liminal_rises_from_a_small_and_falls_from_a_large_lambda_0() -> None:
    kw = {"steps_per_epoch": 10, "total_steps": 30}
    assert liminal_schedule("liminal", step=5, lambda_0=10.0, **kw) == pytest.approx(5.5)
    assert liminal_schedule("liminal", step=5, lambda_0=0.0, **kw) == pytest.approx(0.5)


def test_early_decay_is_liminal_weight_over_one_epoch() -> None:
    for step in range(25):
        assert liminal_schedule(
            "early_decay", step=step, steps_per_epoch=8, total_steps=24, lambda_0=0.7
        ) == liminal_weight(step, lambda0=0.7, period=8)


def test_published_schedule_integrates_to_far_more_than_early_decay() -> None:
    # The point: over 5 epochs the early decay carries a fraction of the weight.
    kw = {"steps_per_epoch": 100, "total_steps": 500, "lambda_0": 1.0}
    published = sum(liminal_schedule("liminal", step=s, **kw) for s in range(500))
    early = sum(liminal_schedule("early_decay", step=s, **kw) for s in range(500))
    assert published == pytest.approx(100 + 200 + 0.5, abs=1e-9)  # 100 at 1, then 400 -> 0
    assert early == pytest.approx(50.5, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "cosine"}, "name"),
        ({"lambda_0": -1.0}, "lambda_0"),
        ({"lambda_0": math.inf}, "lambda_0"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"total_steps": 5}, "total_steps"),
        ({"step": -1}, "step"),
    ],
)
def test_schedule_validates(kwargs: dict, message: str) -> None:
    args = {"name": "liminal", "step": 0, "steps_per_epoch": 10, "total_steps": 50} | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=message):
        liminal_schedule(name, **args)


def numpy_liminal(student: np.ndarray, base: np.ndarray, temperature: float) -> float:
    """``T^2 mean_i KL(softmax(base_i / T) || softmax(student_i / T))`` in float64 numpy."""

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z / temperature
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(base), log_softmax(student)
    return float(temperature**2 * (np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("temperature", [2.0, 1.0, 0.5, 3.7])
def test_loss_matches_numpy_and_the_published_kl_div(temperature: float) -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(7, 10, generator=gen, dtype=torch.float64) * 3
    base = torch.randn(7, 10, generator=gen, dtype=torch.float64) * 3
    loss = liminal_loss(student, base, temperature=temperature)
    assert float(loss) == pytest.approx(
        numpy_liminal(student.numpy(), base.numpy(), temperature), rel=1e-12
    )
    published = (
        F.kl_div(
            F.log_softmax(student / temperature, -1),
            F.softmax(base / temperature, -1),
            reduction="batchmean",
        )
        * temperature**2
    )
    torch.testing.assert_close(loss, published)


def test_loss_default_temperature_is_two() -> None:
    student = torch.randn(4, 5, dtype=torch.float64)
    base = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(
        liminal_loss(student, base), liminal_loss(student, base, temperature=2.0)
    )
    assert not torch.allclose(
        liminal_loss(student, base), liminal_loss(student, base, temperature=1.0)
    )


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_loss_validates_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        liminal_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=temperature)


def test_loss_vmaps_over_a_model_axis() -> None:
    student = torch.randn(3, 5, 4, dtype=torch.float64)  # (model, example, class)
    base = torch.randn(3, 5, 4, dtype=torch.float64)
    batched = torch.func.vmap(liminal_loss)(student, base)
    torch.testing.assert_close(
        batched, torch.stack([liminal_loss(s, b) for s, b in zip(student, base, strict=True)])
    )
