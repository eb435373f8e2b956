"""The plan's cost model: ``auto`` takes ``vmap`` for all only where that is modelled cheaper."""

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from gradlens import ghost_plan, per_example_dots, probe_batch
from gradlens.errors import UnsupportedModelError
from gradlens.probes.forms.cost import KAPPA, Cost, totals
from gradlens.probes.plan import cheapest
from tests.models import loop_grads, loss_fn
from tests.probes.test_forms import assert_matches, two_references
from tests.zoo import make_forms


class WideWithADiagonal(nn.Module):
    """Wide linear layers (factored) and one small parameter read by ``diag`` (no form)."""

    def __init__(self, d: int = 16, wide: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(d, wide)
        self.down = nn.Linear(wide, d)
        self.p = nn.Parameter(torch.randn(d))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(self.drop(torch.tanh(self.up(x))))
        return self.head(torch.tanh(h @ torch.diag(self.p)))


def data(batch: int = 8, d: int = 16) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (batch,), generator=gen)


def test_totals_follow_the_documented_model() -> None:
    a, b = Cost(10.0, 12.0, 80.0), Cost(2.0, math.inf, 16.0)
    auto, all_vmap = totals([(a, False), (b, True)])
    assert auto == pytest.approx(3 * 12 + 12 + 3 * 12 + 16)
    assert all_vmap == pytest.approx(3 * 12 + 80 + 16)
    assert totals([(a, False)]) == (pytest.approx(3 * 10 + 12), pytest.approx(3 * 10 + 80))


def test_every_entry_has_its_cost() -> None:
    torch.manual_seed(0)
    model = WideWithADiagonal().double()
    x, _ = data()
    plan = ghost_plan(model, x)
    assert plan["p"].path == "vmap" and plan["up.weight"].path == "ghost"
    for name, p in model.named_parameters():
        cost = plan[name].cost
        assert cost is not None
        assert cost.vmap == pytest.approx(KAPPA * x.shape[0] * p.numel())
        assert (cost.ghost == math.inf) == (plan[name].path == "vmap")
    assert plan["up.weight"].cost.forward == pytest.approx(8 * 256 * 16)  # (B, wide) x d


def test_a_wide_model_keeps_its_mixed_plan_and_is_exact() -> None:
    torch.manual_seed(0)
    model = WideWithADiagonal().double()
    x, y = data()
    plan = ghost_plan(model, x)
    assert cheapest(plan) == plan  # the ghost pass saves more than the second pass costs
    refs = two_references(model)
    found = probe_batch(model, loss_fn, x, y, references=refs)
    assert found.plan == plan
    assert_matches(found.dots, found.sq_norms, loop_grads(copy.deepcopy(model), x, y), refs)


def test_a_small_model_with_a_parameter_on_vmap_takes_vmap_for_all_and_is_exact() -> None:
    model, x, y = make_forms("lora")  # x @ A.T @ B.T: functional.lora_a and lora_b on vmap
    plan = cheapest(ghost_plan(model, x))
    assert {e.path for e in plan.values()} == {"vmap"}
    assert plan["head.weight"].reason.startswith("by cost: vmap for every parameter")
    refs = two_references(model)
    found = probe_batch(model, loss_fn, x, y, references=refs)
    assert found.plan == plan
    assert_matches(found.dots, found.sq_norms, loop_grads(copy.deepcopy(model), x, y), refs)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, references=refs)
    assert_matches(dots, sq_norms, loop_grads(copy.deepcopy(model), x, y), refs)


def test_a_mixed_plan_with_dropout_is_refused_where_it_is_the_cheaper() -> None:
    torch.manual_seed(0)
    model = WideWithADiagonal(dropout=0.5).double().train()
    x, y = data()
    plan = ghost_plan(model, x, randomness="different")
    assert cheapest(plan) == plan and plan["p"].path == "vmap"
    with pytest.raises(UnsupportedModelError, match="method='vmap'"):
        per_example_dots(
            model, loss_fn, x, y, reference=two_references(model)["trait"], randomness="different"
        )
