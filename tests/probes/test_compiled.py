"""Compiled models (torch.compile, model.compile()) are probed exactly, and stay usable after."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, per_example_dots, probe_batch, probed_step


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def compiled_wrapper(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="aot_eager")


def compiled_in_place(model: nn.Module) -> nn.Module:
    model.compile(backend="aot_eager")
    return model


def compiled_submodule(model: nn.Module) -> nn.Module:
    model[1] = torch.compile(model[1], backend="aot_eager")
    return model


COMPILE: dict[str, Callable[[nn.Module], nn.Module]] = {
    "torch.compile(model)": compiled_wrapper,
    "model.compile()": compiled_in_place,
    "a compiled submodule": compiled_submodule,
}


def loop(model: nn.Module, x: Tensor, y: Tensor, ref: dict[str, Tensor]) -> tuple[dict, dict]:
    """The float64 oracle: one autograd.grad per example, on the uncompiled model."""
    dots: dict[str, list[Tensor]] = {n: [] for n in ref}
    sq: dict[str, list[Tensor]] = {n: [] for n in ref}
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads, strict=True):
            dots[name].append((g * ref[name]).sum())
            sq[name].append(g.square().sum())
    return {n: torch.stack(v) for n, v in dots.items()}, {n: torch.stack(v) for n, v in sq.items()}


def run_compiled(model: nn.Module, x: Tensor) -> Tensor:
    """The compiled forward, outside any probe (dynamo compiles here)."""
    with warnings.catch_warnings():
        # torch's own: dynamo reads .grad of a non-leaf input when it compiles a submodule
        warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf")
        return model(x)


def plain_names(name: str) -> str:
    return name.replace("_orig_mod.", "")


@pytest.mark.parametrize("how", list(COMPILE))
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_a_compiled_model_gives_the_loops_dots_and_norms(how: str, method: str) -> None:
    plain = net()
    model = COMPILE[how](copy.deepcopy(plain))
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    ref = {n: torch.randn_like(p) for n, p in plain.named_parameters()}
    want_dots, want_sq = loop(plain, x, y, ref)
    names = {plain_names(n): n for n, _ in model.named_parameters()}
    mine = {names[n]: r for n, r in ref.items()}
    dots, sq = per_example_dots(model, F.cross_entropy, x, y, reference=mine, method=method)
    probe = probe_batch(model, F.cross_entropy, x, y, reference=mine, method=method)
    for name in ref:
        torch.testing.assert_close(dots[names[name]], want_dots[name])
        torch.testing.assert_close(sq[names[name]], want_sq[name])
        torch.testing.assert_close(probe.dots[names[name]], want_dots[name])
    # and the compiled model is still the user's compiled model afterwards
    torch.testing.assert_close(run_compiled(model, x), plain(x))


def test_a_compiled_step_equals_the_plain_step_and_the_next_compiled_model_runs() -> None:
    plain = net()
    model = compiled_wrapper(copy.deepcopy(plain))
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    px, py = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    results = []
    for m in (plain, model):
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        out = probed_step(
            m, opt, Objective(F.mse_loss, x, (t,)), Objective(F.cross_entropy, px, (py,))
        )
        results.append(out)
    for key, value in results[0].records.items():
        torch.testing.assert_close(results[1].records[key], value, msg=key)
    torch.testing.assert_close(results[1].example_cosine, results[0].example_cosine)
    for (_, a), (_, b) in zip(plain.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b)
    other = compiled_wrapper(net())  # a second compiled model in the same process
    torch.testing.assert_close(run_compiled(other, x), net()(x))
