"""probed_step against an independent float64 replay: plain autograd and a twin optimizer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, probed_step
from gradlens.alignment.gradops import cosine
from gradlens.errors import NonFiniteGradientError
from gradlens.transforms import (
    remove_aligned,
    remove_aligned_per_example,
    reverse_aligned,
)

LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}


def setup(
    seed: int = 0, lr: float = 1e-2
) -> tuple[nn.Module, torch.optim.Optimizer, Objective, Objective]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_t, y_t = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    x_d, y_d = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    return model, opt, Objective(F.mse_loss, x_d, (y_d,)), Objective(F.cross_entropy, x_t, (y_t,))


def grad_of(model: nn.Module, objective: Objective, rows: slice = slice(None)) -> dict[str, Tensor]:
    """The gradient of ``objective`` on ``rows`` by plain autograd, by parameter name."""
    names, params = zip(*model.named_parameters(), strict=True)
    inputs, targets = objective.inputs[rows], [t[rows] for t in objective.targets]
    loss = objective.loss_fn(model(inputs), *targets)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def flat(values: dict[str, Tensor], names: list[str] | None = None) -> Tensor:
    return torch.cat([values[n].reshape(-1) for n in names or list(values)])


def cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def twin_step(model: nn.Module, opt: torch.optim.Optimizer, grads: dict[str, Tensor]) -> None:
    """An ordinary optimizer step with ``grads`` as the gradient."""
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    opt.step()
    opt.zero_grad(set_to_none=True)


def without(g: dict[str, Tensor], r: dict[str, Tensor]) -> dict[str, Tensor]:
    """``g`` minus its projection on ``r``, over all parameters at once."""
    c = flat(g) @ flat(r) / (flat(r) @ flat(r))
    return {n: g[n] - c * r[n] for n in g}


def assert_same_params(model: nn.Module, twin: nn.Module) -> None:
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_plain_step_matches_an_ordinary_adam_step_and_records_alignment() -> None:
    model, opt, train, trait = setup()
    twin, twin_opt, _, _ = setup()
    old = params_of(twin)
    g_t, g_d = grad_of(twin, trait), grad_of(twin, train)
    g_i = [flat(grad_of(twin, train, slice(i, i + 1))) for i in range(16)]
    with torch.no_grad():
        trait_before = float(F.cross_entropy(twin(trait.inputs), *trait.targets))
        train_before = float(F.mse_loss(twin(train.inputs), *train.targets))

    result = probed_step(model, opt, train, trait, step=0)
    twin_step(twin, twin_opt, g_d)
    assert_same_params(model, twin)

    t, d = flat(g_t), flat(g_d)
    delta = flat(params_of(twin)) - flat(old)
    moved = {n: p - old[n] for n, p in params_of(twin).items()}
    with torch.no_grad():
        trait_after = float(F.cross_entropy(twin(trait.inputs), *trait.targets))
    example_cos = np.array([cos(g, t) for g in g_i])
    assert abs(cos(t, d)) > 1e-3 and example_cos.std() > 1e-3  # nothing degenerate
    expected = {
        "train_loss": train_before,
        "trait_loss": trait_before,
        "cosine": cos(t, d),
        "trait_norm": float(t.norm()),
        "train_norm": float(d.norm()),
        "projection": float(t @ d / (t @ t)),
        "layer_cosine": [cos(flat(g_t, ns), flat(g_d, ns)) for ns in LAYERS.values()],
        "layer_trait_norm": [float(flat(g_t, ns).norm()) for ns in LAYERS.values()],
        "layer_train_norm": [float(flat(g_d, ns).norm()) for ns in LAYERS.values()],
        "applied_cosine": cos(t, d),  # no transform: the gradient handed to the optimizer
        "update_cosine": cos(t, delta),
        "predicted_change": float(t @ delta),
        "layer_predicted_change": [
            float(flat(g_t, ns) @ flat(moved, ns)) for ns in LAYERS.values()
        ],
        "measured_change": trait_after - trait_before,
        "example_cosine_mean": example_cos.mean(),
        "example_cosine_quantile": np.quantile(example_cos, [0.05, 0.25, 0.5, 0.75, 0.95]),
        "example_cosine_frac_positive": (example_cos > 0).mean(),
    }
    assert result.records.keys() == expected.keys()
    for name, value in expected.items():
        # the example summaries are float32; everything else is float64
        tol = 1e-6 if name.startswith("example_") else 1e-10
        np.testing.assert_allclose(
            result.records[name].numpy(), value, rtol=tol, atol=tol, err_msg=name
        )
    np.testing.assert_allclose(result.example_cosine.numpy(), example_cos, rtol=1e-10)
    assert result.before_state is None and result.after_state is None


def test_first_order_prediction_matches_measured_change_for_small_steps() -> None:
    model, opt, train, trait = setup(lr=1e-5)
    r = probed_step(model, opt, train, trait).records
    assert abs(float(r["measured_change"])) > 1e-7  # a change to predict, not two zeros
    torch.testing.assert_close(r["measured_change"], r["predicted_change"], rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("placement", ["before", "after"])
def test_remove_makes_the_applied_update_orthogonal_only_after_the_optimizer(
    placement: str,
) -> None:
    model, opt, train, trait = setup()
    twin, twin_opt, _, _ = setup()
    old = params_of(twin)
    g_t, g_d = grad_of(twin, trait), grad_of(twin, train)
    tx = remove_aligned()
    state = tx.init(dict(model.named_parameters()))
    kwargs = {placement: tx, f"{placement}_state": state}
    result = probed_step(model, opt, train, trait, **kwargs)

    if placement == "before":  # Adam steps on g_d without its g_t component
        twin_step(twin, twin_opt, without(g_d, g_t))
    else:  # Adam steps on g_d, then its update loses its g_t component
        twin_step(twin, twin_opt, g_d)
        update = without({n: p.detach() - old[n] for n, p in twin.named_parameters()}, g_t)
        with torch.no_grad():
            for name, p in twin.named_parameters():
                p.copy_(old[name] + update[name])
    assert_same_params(model, twin)
    t, delta = flat(g_t), flat(params_of(model)) - flat(old)
    update_cosine = float(result.records["update_cosine"])
    assert update_cosine == pytest.approx(cos(t, delta), abs=1e-10)
    state = result.before_state if placement == "before" else result.after_state
    assert abs(float(state.cosine_after)) < 1e-10 < abs(float(state.cosine_before))
    if placement == "after":
        assert abs(update_cosine) < 1e-10
    else:
        # Adam rescales coordinates, so a gradient orthogonal to g_t does not make an
        # orthogonal step in general; the transform's own record shows the removal.
        assert abs(update_cosine) > 1e-6


def test_after_transforms_see_minus_g_t_so_positive_means_teaching_the_trait() -> None:
    model, opt, train, trait = setup()
    twin, twin_opt, _, _ = setup()
    old = params_of(twin)
    g_t, g_d = grad_of(twin, trait), grad_of(twin, train)
    twin_step(twin, twin_opt, g_d)
    t, adam_delta = flat(g_t), flat(params_of(twin)) - flat(old)
    tx = reverse_aligned()
    result = probed_step(model, opt, train, trait, after=tx, after_state=tx.init(g_t))
    # the transform saw the update against -g_t: cos(delta, -g_t) = -cos(delta, g_t)
    teaching = -cos(adam_delta, t)
    assert abs(teaching) > 1e-3
    assert float(result.after_state.cosine_before) == pytest.approx(teaching, abs=1e-10)
    # reversal flips the component along g_t and keeps the rest
    c = adam_delta @ t / (t @ t)
    applied = flat(params_of(model)) - flat(old)
    torch.testing.assert_close(applied, adam_delta - 2 * c * t, rtol=1e-9, atol=1e-12)
    assert float(result.records["update_cosine"]) == pytest.approx(teaching, abs=1e-10)


def test_per_example_transform_after_the_optimizer_fails_loudly() -> None:
    model, opt, train, trait = setup()
    tx = remove_aligned_per_example()
    with pytest.raises(TypeError, match="example_dots"):
        probed_step(
            model, opt, train, trait, after=tx, after_state=tx.init(dict(model.named_parameters()))
        )


def test_per_example_transform_before_the_optimizer_acts() -> None:
    model, opt, train, trait = setup()
    twin, twin_opt, _, _ = setup()
    g_t, g_d = grad_of(twin, trait), grad_of(twin, train)
    tx = remove_aligned_per_example()
    result = probed_step(model, opt, train, trait, before=tx, before_state=tx.init(g_t))
    # removing each example's component removes their mean's: Adam steps on g_d without g_t
    twin_step(twin, twin_opt, without(g_d, g_t))
    assert_same_params(model, twin)
    assert abs(float(result.before_state.cosine_after)) < 1e-10
    # the probe saw g_d before the transform
    assert float(result.records["cosine"]) == pytest.approx(cos(flat(g_t), flat(g_d)), abs=1e-10)


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
