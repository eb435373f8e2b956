import pytest
import torch
from torch import nn

from gradlens import per_example_grads
from gradlens.errors import GradientMismatchError, UnsupportedModelError
from gradlens.probes.ghost import per_example_dots
from tests.models import KINDS, loop_grads, loss_fn, make_case


def reference_for(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_dots_and_norms_match_autograd_loop(kind: str, method: str) -> None:
    model, x, y = make_case(kind)
    ref = reference_for(model)
    expected = loop_grads(model, x, y)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, reference=ref, method=method)
    for name, g in expected.items():
        flat = g.flatten(start_dim=1)
        torch.testing.assert_close(dots[name], flat @ ref[name].reshape(-1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sq_norms[name], flat.pow(2).sum(1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_ghost_path_equals_materialised_path(kind: str) -> None:
    model, x, y = make_case(kind, batch=9)
    ref = reference_for(model)
    ghost = per_example_dots(model, loss_fn, x, y, reference=ref, method="auto")
    vmap = per_example_dots(model, loss_fn, x, y, reference=ref, method="vmap", chunk_size=4)
    for got, want in zip(ghost, vmap, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_long_sequences_use_materialised_norm_branch() -> None:
    # token^2 > d_in * d_out selects the per-example-outer-product branch of the ghost norm.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2)).double()
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (3,))

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(out.mean(dim=1), t)

    ref = reference_for(model)
    ghost = per_example_dots(model, loss, x, y, reference=ref, method="ghost")
    grads = per_example_grads(model, loss, x, y)
    for name, g in grads.items():
        torch.testing.assert_close(ghost[1][name], g.flatten(1).pow(2).sum(1))


def test_ghost_only_raises_for_layers_without_factored_form() -> None:
    model, x, y = make_case("mlp")
    model[1] = nn.PReLU().double()
    why = r"exact ghost form: '1.weight' \(read by prelu, which has no factored form\)"
    with pytest.raises(UnsupportedModelError, match=why):
        per_example_dots(model, loss_fn, x, y, reference=reference_for(model), method="ghost")


def test_linear_used_twice_falls_back_and_stays_exact() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    model = Twice().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = reference_for(model)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, reference=ref)
    expected = loop_grads(model, x, y)
    for name, g in expected.items():
        torch.testing.assert_close(sq_norms[name], g.flatten(1).pow(2).sum(1))
        torch.testing.assert_close(dots[name], g.flatten(1) @ ref[name].reshape(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_no_hook_stays_installed(kind: str) -> None:
    model, x, y = make_case(kind)
    per_example_dots(model, loss_fn, x, y, reference=reference_for(model))
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks


def test_no_grad_context_and_params_subset() -> None:
    model, x, y = make_case("mlp")
    ref = {"2.weight": reference_for(model)["2.weight"]}
    with torch.no_grad():
        dots, _ = per_example_dots(model, loss_fn, x, y, reference=ref, params=["2.weight"])
    expected = loop_grads(model, x, y)["2.weight"].flatten(1) @ ref["2.weight"].reshape(-1)
    torch.testing.assert_close(dots["2.weight"], expected)
    assert all(p.grad is None for p in model.parameters())


def test_reference_mismatch_names_the_difference() -> None:
    model, x, y = make_case("mlp")
    ref = reference_for(model)
    del ref["0.bias"]
    with pytest.raises(GradientMismatchError, match=r"only in the first \['0.bias'\]"):
        per_example_dots(model, loss_fn, x, y, reference=ref)
    ref = reference_for(model)
    ref["0.bias"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(GradientMismatchError, match=r"'0.bias': \(6,\) against \(2,\)"):
        per_example_dots(model, loss_fn, x, y, reference=ref)


def test_unknown_method_is_an_error() -> None:
    model, x, y = make_case("mlp")
    with pytest.raises(ValueError, match="method must be"):
        per_example_dots(model, loss_fn, x, y, reference=reference_for(model), method="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_probe_batch_gives_losses_mean_grad_and_dots(kind: str, method: str) -> None:
    from gradlens.probes import mean_grad
    from gradlens.probes.ghost import probe_batch

    model, x, y = make_case(kind, batch=6)
    ref = reference_for(model)
    found = probe_batch(model, loss_fn, x, y, reference=ref, method=method, chunk_size=4)
    expected = loop_grads(model, x, y)
    plain = mean_grad(model, loss_fn, x, y)
    losses = torch.stack([loss_fn(model(x[i : i + 1]), y[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(found.losses, losses.detach())
    for name, g in expected.items():
        torch.testing.assert_close(found.grad[name], plain[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(found.dots[name], g.flatten(1) @ ref[name].reshape(-1))
        torch.testing.assert_close(found.sq_norms[name], g.flatten(1).pow(2).sum(1))
