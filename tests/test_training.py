import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlens import NonFiniteGradientError, Objective, probed_step
from gradlens.gradops import cosine
from gradlens.per_example import mean_grad
from gradlens.transforms import (
    remove_aligned,
    remove_aligned_per_example,
    reverse_aligned,
)


def setup(
    seed: int = 0, lr: float = 1e-2
) -> tuple[nn.Module, torch.optim.Optimizer, Objective, Objective]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_t, y_t = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    x_d, y_d = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    return model, opt, Objective(F.mse_loss, x_d, (y_d,)), Objective(F.cross_entropy, x_t, (y_t,))


def test_plain_step_matches_an_ordinary_adam_step_and_records_alignment() -> None:
    model, opt, train, trait = setup()
    twin, twin_opt, _, _ = setup()
    result = probed_step(model, opt, train, trait, step=0)
    twin_opt.zero_grad()
    F.mse_loss(twin(train.inputs), *train.targets).backward()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    g_t = mean_grad(twin, F.cross_entropy, trait.inputs, *trait.targets)  # after the step
    assert result.records["layer_cosine"].shape == (2,)
    assert result.example_cosine.shape == (16,)
    assert set(result.records) >= {"cosine", "update_cosine", "predicted_change", "trait_loss"}
    assert g_t.keys() == dict(model.named_parameters()).keys()


def test_first_order_prediction_matches_measured_change_for_small_steps() -> None:
    model, opt, train, trait = setup(lr=1e-5)
    r = probed_step(model, opt, train, trait).records
    torch.testing.assert_close(r["measured_change"], r["predicted_change"], rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_remove_makes_the_applied_update_orthogonal_only_after_the_optimizer(
    placement: str,
) -> None:
    model, opt, train, trait = setup()
    tx = remove_aligned()
    state = tx.init(dict(model.named_parameters()))
    kwargs = {placement: tx, f"{placement}_state": state}
    r = probed_step(model, opt, train, trait, **kwargs).records
    if placement == "after":
        assert abs(float(r["update_cosine"])) < 1e-10
    else:
        # Adam rescales coordinates, so a gradient orthogonal to g_t does not make an
        # orthogonal step in general; the transform's own record shows the removal.
        assert abs(float(r["update_cosine"])) > 1e-6


def test_after_transforms_see_minus_g_t_so_positive_means_teaching_the_trait() -> None:
    model, opt, train, trait = setup()
    g_t = mean_grad(model, F.cross_entropy, trait.inputs, *trait.targets)
    tx = reverse_aligned()
    result = probed_step(model, opt, train, trait, after=tx, after_state=tx.init(g_t))
    r = result.records
    # the recorded cosine_before is cos(delta_before_transform, -g_t); reversal flips it
    assert float(result.after_state.cosine_before) * float(r["update_cosine"]) > 0


def test_per_example_transform_after_the_optimizer_fails_loudly() -> None:
    model, opt, train, trait = setup()
    tx = remove_aligned_per_example()
    with pytest.raises(TypeError, match="example_dots"):
        probed_step(
            model, opt, train, trait, after=tx, after_state=tx.init(dict(model.named_parameters()))
        )


def test_per_example_transform_before_the_optimizer_acts() -> None:
    model, opt, train, trait = setup()
    tx = remove_aligned_per_example()
    g_t = mean_grad(model, F.cross_entropy, trait.inputs, *trait.targets)
    result = probed_step(model, opt, train, trait, before=tx, before_state=tx.init(g_t))
    assert abs(float(result.before_state.cosine_after)) < 1e-10
    assert abs(float(result.records["cosine"])) > 1e-6  # the probe saw g_d before the transform


def test_non_finite_gradient_is_reported_with_the_step() -> None:
    model, opt, train, trait = setup()
    bad = Objective(train.loss_fn, train.inputs.clone(), train.targets)
    bad.inputs[3, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="training gradient at step 7") as info:
        probed_step(model, opt, bad, trait, step=7)
    assert info.value.step == 7 and "0.weight" in info.value.names


def test_cosine_of_zero_training_gradient_is_zero_not_nan() -> None:
    model, opt, train, trait = setup()
    zero = Objective(lambda out, t: 0.0 * out.sum(), train.inputs, train.targets)
    r = probed_step(model, opt, zero, trait).records
    assert float(r["cosine"]) == 0.0 and float(r["train_norm"]) == 0.0
    assert torch.isfinite(r["update_cosine"])
    assert float(cosine({"a": torch.zeros(2)}, {"a": torch.ones(2)})) == 0.0
