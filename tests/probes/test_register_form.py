"""A user's factored form for a new op (F.bilinear), registered and exact against the loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import ghost_plan, per_example_dots
from gradlens.probes.forms import (
    Call,
    Form,
    Layout,
    argument,
    from_materialised,
    register_form,
    registry,
    to_examples,
)


def bind_bilinear(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``torch.bilinear(input1, input2, weight, bias)``: examples along axis 0 of both inputs."""
    x1 = argument(args, kwargs, 0, "input1", None)
    x2 = argument(args, kwargs, 1, "input2", None)
    if x1.ndim != 2 or x2.ndim != 2:
        return "F.bilinear on inputs that are not (example, feature)"
    params = {"weight": argument(args, kwargs, 2, "weight", None)}
    params["bias"] = argument(args, kwargs, 3, "bias", None)
    return Call(x1, params, {"last_axis": 0, "other": x2})


def compute_bilinear(
    call: Call, grad_output: Tensor, layout: Layout, references: Mapping[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """``G_i[o, j, k] = b_io x1_ij x2_ik``, the bias ``b_i``: materialised per example."""
    batch = call.input.shape[layout.axis] // layout.rows
    x1 = to_examples(call.input, layout, batch)[:, 0]
    x2 = to_examples(call.options["other"], layout, batch)[:, 0]
    b = to_examples(grad_output, layout, batch)[:, 0]
    found = {}
    if "weight" in references:
        per = torch.einsum("bo,bj,bk->bojk", b, x1, x2)
        found["weight"] = from_materialised(per, references["weight"])
    if "bias" in references:
        found["bias"] = from_materialised(b, references["bias"])
    return found


BILINEAR = Form("F.bilinear", (torch.bilinear,), bind_bilinear, compute_bilinear)


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Bilinear(3, 4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(x[:, :3], x[:, 3:])))


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in a test do not outlive it."""
    monkeypatch.setattr(registry, "_BY_FUNC", dict(registry._BY_FUNC))


def test_a_registered_form_takes_the_ghost_path_and_is_exact(fresh_registry: None) -> None:
    model = Pair().double()
    x, y = torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 2, (6,))
    assert ghost_plan(model, x)["mix.weight"].path == "vmap"  # no form yet
    register_form(BILINEAR)
    plan = ghost_plan(model, x)  # a new plan: the registry changed since the cached one
    assert plan["mix.weight"].path == "ghost" and plan["mix.weight"].form == "F.bilinear"
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    dots, sq = per_example_dots(model, F.cross_entropy, x, y, reference=ref, method="ghost")
    for i in range(6):  # the float64 loop
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
        )
        for (name, _), g in zip(model.named_parameters(), grads, strict=True):
            torch.testing.assert_close(dots[name][i], (g * ref[name]).sum())
            torch.testing.assert_close(sq[name][i], g.square().sum())


def test_a_function_with_a_form_is_not_taken_silently(fresh_registry: None) -> None:
    linear = Form("my linear", (torch._C._nn.linear,), bind_bilinear, compute_bilinear)
    with pytest.raises(ValueError, match="replace=True"):
        register_form(linear)
