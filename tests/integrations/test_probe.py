"""TrainerProbe in a plain loop (no trainer needed): its refusals, and trait_every."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, probed_step
from gradlens.errors import GradientMismatchError, UnsupportedModelError
from gradlens.integrations import TrainerProbe
from gradlens.training import reuse_trait, transform_layout
from gradlens.transforms import remove_aligned, remove_aligned_per_example
from tests.integrations.replay import (
    assert_rows_match,
    assert_same_params,
    data,
    net,
    row,
    trait,
)


def logits_loss(out: dict[str, Tensor], y: Tensor) -> Tensor:
    return F.cross_entropy(out["logits"], y)


def backward(model: nn.Module, x: Tensor, y: Tensor, scale: float = 1.0) -> None:
    (scale * F.cross_entropy(model(x)["logits"], y)).backward()


def started(**kwargs: object) -> tuple[nn.Module, TrainerProbe]:
    model = net()
    probe = TrainerProbe(trait(), output="logits", **kwargs)  # type: ignore[arg-type]
    probe.start(model)
    return model, probe


def test_a_trained_parameter_without_grad_is_named() -> None:
    model, probe = started()
    x, y = data(8)
    backward(model, x, y)
    model.body[2].bias.grad = None
    with pytest.raises(UnsupportedModelError, match=r"body\.2\.bias.*Freeze them"):
        probe.pre_step(model, 0)


def test_a_per_example_transform_needs_the_per_example_pass() -> None:
    model, probe = started(before=remove_aligned_per_example())
    x, y = data(8)
    backward(model, x, y)
    with pytest.raises(TypeError, match="per-example transform"):
        probe.pre_step(model, 0)


def test_a_per_example_after_transform_is_refused() -> None:
    with pytest.raises(TypeError, match="after= is a per-example transform"):
        TrainerProbe(trait(), after=remove_aligned_per_example())


def test_momentum_needs_the_optimizer_at_post_step() -> None:
    model, probe = started(momentum=True)
    x, y = data(8)
    backward(model, x, y)
    probe.pre_step(model, 0)
    with pytest.raises(ValueError, match="pass the optimizer to post_step"):
        probe.post_step(model)


def test_post_step_without_pre_step_is_refused() -> None:
    model, probe = started()
    with pytest.raises(RuntimeError, match="post_step without pre_step"):
        probe.post_step(model)


@pytest.mark.parametrize(
    ("sizes", "scale"),
    [((4, 4), 2.0), ((2, 6), 0.5)],
    ids=["a scaled loss", "mean of unequal micro-batch means"],
)
def test_examples_that_do_not_make_up_grad_are_refused(
    sizes: tuple[int, int], scale: float
) -> None:
    model, probe = started()
    x, y = data(sum(sizes))
    start = 0
    for size in sizes:  # each micro-batch's mean loss times `scale`: not the examples' mean
        xb, yb = x[start : start + size], y[start : start + size]
        probe.example_pass(model, F.cross_entropy, xb, yb)
        backward(model, xb, yb, scale)
        start += size
    with pytest.raises(GradientMismatchError, match="does not describe the trainer's gradient"):
        probe.pre_step(model, 0)


def test_a_clipped_grad_is_described_by_its_examples() -> None:
    model, probe = started()
    x, y = data(8)
    probe.example_pass(model, F.cross_entropy, x, y)
    backward(model, x, y)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01))
    assert norm > 0.01  # it did clip
    probe.pre_step(model, 0, max_norm=0.01)
    records = probe.post_step(model)
    assert float(records["train_norm"]) == pytest.approx(0.01, rel=1e-4)  # eps 1e-6 of clipping
    with pytest.raises(GradientMismatchError):  # the same step, not told it was clipped
        probe.example_pass(model, F.cross_entropy, x, y)
        model.zero_grad()
        backward(model, x, y)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        probe.pre_step(model, 1)


def step(model: nn.Module, probe: TrainerProbe, x: Tensor, y: Tensor, number: int) -> None:
    model.zero_grad()
    probe.example_pass(model, F.cross_entropy, x, y)
    backward(model, x, y)
    probe.pre_step(model, number)
    probe.post_step(model)


def test_a_short_step_is_padded_with_nan_and_a_longer_one_refused() -> None:
    model, probe = started()
    x, y = data(14)
    step(model, probe, x[:6], y[:6], 0)
    step(model, probe, x[6:10], y[6:10], 1)  # the epoch's last, shorter step
    assert probe.result is not None
    short = probe.result.example_cosine
    run = probe.recorder.dataset()  # type: ignore[union-attr]
    cosines = run["example_cosine"].values
    assert cosines.shape == (2, 6)
    np.testing.assert_allclose(cosines[1, :4], short.numpy(), rtol=1e-6)  # stored as float32
    assert np.isnan(cosines[1, 4:]).all() and not np.isnan(cosines[0]).any()
    with pytest.raises(ValueError, match=r"first step had 6.*drop_last"):
        step(model, probe, x[:8], y[:8], 2)


def test_trait_every_reuses_g_t_as_probed_step_does() -> None:
    """TrainerProbe(trait_every=2) in a plain loop equals probed_step with reuse_trait(2)."""
    model, probe = started(before=remove_aligned(), trait_every=2)
    twin = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    tx = remove_aligned()
    state, cache = tx.init(dict(twin.named_parameters())), reuse_trait(2)
    layout = transform_layout(dict(twin.named_parameters()), before=tx)
    x, y = data(15)
    got, want = [], []
    for number in range(3):
        xb, yb = x[5 * number : 5 * number + 5], y[5 * number : 5 * number + 5]
        model.zero_grad()
        probe.example_pass(model, F.cross_entropy, xb, yb)
        backward(model, xb, yb)
        probe.pre_step(model, number)
        opt.step()
        probe.post_step(model)
        assert probe.result is not None
        got.append(row(probe.result, probe.layout))
        result = probed_step(
            twin,
            twin_opt,
            Objective(F.cross_entropy, xb, (yb,)),
            trait(),
            before=tx,
            before_state=state,
            output="logits",
            trait_cache=cache,
        )
        state, cache = result.before_state, result.trait_cache
        want.append(row(result, layout))
    assert [int(r["trait_age"]) for r in got] == [0, 1, 0]  # counts, exact
    assert torch.isnan(got[1]["measured_change"]) and torch.isfinite(got[2]["measured_change"])
    assert "trait_age" in assert_rows_match(got, want, examples=True)  # NaN matches NaN
    assert_same_params(model, twin)


def test_record_false_keeps_no_rows_but_the_results_and_scalars() -> None:
    model, probe = started(record=False)
    x, y = data(8)
    step(model, probe, x, y, 0)
    assert probe.recorder is None
    assert probe.result is not None and "cosine" in probe.result.records
    assert "gradlens/cosine" in probe.scalars()
    with pytest.raises(ValueError, match=r"record=False.*would write nothing"):
        TrainerProbe(trait(), path="run.nc", record=False)
