"""The plan travels with the results: in StepResult, and as a run file attr."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradlens import (
    Objective,
    Recorder,
    ghost_plan,
    open_run,
    probed_step,
    stack_modules,
    stacked_probed_step,
)
from gradlens.training import plan_attr, step_coords, step_values, step_variables


def test_the_step_returns_its_plan_and_a_run_file_keeps_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    trait = Objective(F.cross_entropy, torch.randn(7, 4), (torch.randint(0, 3, (7,)),))
    ahead = plan_attr(ghost_plan(model, x))  # known before the run: what the step will follow
    path = tmp_path / "run.nc"
    with Recorder(
        path, step_variables(), coords=step_coords(["0", "2"]), attrs={"plan": ahead}
    ) as rec:
        out = probed_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            Objective(F.mse_loss, x, (y,)),
            trait,
        )
        rec.log(0, **step_values(out))
    assert {n: e.path for n, e in out.plan.items()} == {
        n: "ghost" for n, _ in model.named_parameters()
    }
    assert plan_attr(out.plan) == ahead
    stored = json.loads(open_run(path).attrs["plan"])
    assert stored["0.weight"] == {
        "path": "ghost",
        "reason": out.plan["0.weight"].reason,
        "form": "F.linear",
    }


def test_a_stacked_step_names_its_path() -> None:
    torch.manual_seed(0)
    stack = stack_modules([nn.Sequential(nn.Linear(4, 3)) for _ in range(2)])
    x = torch.randn(2, 5, 4)
    trait = Objective(F.cross_entropy, x, (torch.randint(0, 3, (2, 5)),))
    out = stacked_probed_step(
        stack,
        torch.optim.SGD(stack.params.values(), lr=0.1),
        Objective(F.mse_loss, x, (torch.randn(2, 5, 3),)),
        trait,
    )
    assert {e.path for e in out.plan.values()} == {"ghost"}
    out = stacked_probed_step(
        stack,
        torch.optim.SGD(stack.params.values(), lr=0.1),
        Objective(F.mse_loss, x, (torch.randn(2, 5, 3),)),
        trait,
        method="vmap",
    )
    assert {e.path for e in out.plan.values()} == {"vmap"}
