"""The broadcast form keeps to what the traces establish, and is exact where it is taken (issue 21).

The zoo (``tests/probes/test_forms.py``, entries ``broadcasts``, ``llama``, ``vit``, ``gpt2``)
checks its values on realistic uses; here each use it must refuse goes to ``vmap``, with
the reason, and stays exact.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import ghost_plan, per_example_dots
from tests.models import loop_grads, loss_fn
from tests.probes.test_forms import assert_matches, two_references
from tests.zoo import make_forms

D = 4


class Uses(nn.Module):
    """``p`` used as ``use`` says; ``q`` always added (a control on the broadcast path)."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.switched = False
        self.inp = nn.Linear(D, D)
        self.p = nn.Parameter(torch.randn(D))
        self.q = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x)) + self.q  # (example, d)
        if self.use == "scaled_by_a_statistic":  # p * (example, 1): not broadcast into h
            h = h + self.p * h.mean(dim=1, keepdim=True)
        elif self.use == "matmul":
            h = h @ torch.diag(self.p)
        elif self.use == "written_in_place":
            h = h + self.p
            h.mul_(2.0)
        elif self.use == "dropout":
            h = h + F.dropout(self.p, 0.5, training=True)
        elif self.use == "alpha":
            h = torch.add(h, self.p, alpha=0.5)
        elif self.use == "expand":  # rows reaching their own example: the broadcast form
            h = h + self.p.expand(h.shape[0], -1)
        elif self.use == "expand_flipped":  # row k reaches example n - 1 - k
            h = torch.cat([h[:, :2], h[:, 2:] + self.p.expand(h.shape[0], -1)[:, 2:].flip(0)], 1)
        elif self.use == "switches":  # add when planned, mul after: the cached plan is stale
            h = h * self.p if self.switched else h + self.p
        elif self.use == "in_place_flow":  # not run again: the forward's graph is kept
            d = self.p.clone()
            d.mul_(2.0)
            h = h + d.view(1, -1)
        elif self.use == "viewed":  # run again from p: view, to
            h = h + self.p.view(1, -1).to(h.dtype)
        elif self.use == "detached":  # no gradient: zero per-example gradients, on vmap
            h = h + self.p.detach()
        elif self.use == "long_chain":  # more operations than the trace follows
            d = self.p
            for _ in range(70):
                d = d.view(-1)
            h = h + d
        elif self.use == "returned":  # a loss could read the second: refused, whatever it is
            return {"logits": self.head(torch.tanh(h + self.p)), "scale": self.p * 2}
        return self.head(torch.tanh(h))


def data(batch: int = 5) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, D, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (batch,), generator=gen),
    )


def assert_exact(model: nn.Module, x: Tensor, y: Tensor, **kwargs: object) -> None:
    refs = two_references(model)
    dots, sq_norms = per_example_dots(model, loss_fn, x, y, references=refs, **kwargs)
    assert_matches(dots, sq_norms, loop_grads(copy.deepcopy(model), x, y), refs)


@pytest.mark.parametrize(
    ("use", "reason"),
    [
        ("scaled_by_a_statistic", "read by mul, which has no factored form"),
        ("matmul", "read by diag, which has no factored form"),
        ("written_in_place", "read by add, which has no factored form"),
        ("alpha", "read by add, which has no factored form"),
        ("expand_flipped", "reaches another example's output"),
        ("long_chain", "read by view, which has no factored form"),
    ],
)
def test_a_use_the_form_cannot_prove_stays_on_vmap_and_exact(use: str, reason: str) -> None:
    torch.manual_seed(0)
    model = Uses(use).double()
    x, y = data()
    plan = ghost_plan(model, x)
    assert plan["p"].path == "vmap" and reason in plan["p"].reason, plan["p"]
    assert plan["q"].path == "ghost" and plan["q"].form == "broadcast", plan["q"]
    assert_exact(model, x, y)


def test_a_detached_parameter_stays_on_vmap_with_zero_gradients() -> None:
    torch.manual_seed(0)
    model = Uses("detached").double()
    x, y = data()
    entry = ghost_plan(model, x)["p"]
    assert entry.path == "vmap" and "read by detach" in entry.reason, entry
    dots, sq_norms = per_example_dots(
        model, loss_fn, x, y, reference=two_references(model)["trait"]
    )
    assert float(dots["p"].abs().max()) < 1e-12 and float(sq_norms["p"].max()) < 1e-24
    assert float(sq_norms["q"].min()) > 0


@pytest.mark.parametrize("use", ["in_place_flow", "viewed"])
def test_a_flow_run_again_or_kept_is_exact(use: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradlens.probes import capture

    found: list[object] = []
    real = capture.replay
    monkeypatch.setattr(capture, "replay", lambda *a: found.append(real(*a)) or found[-1])
    torch.manual_seed(0)
    model = Uses(use).double()
    x, y = data()
    assert ghost_plan(model, x)["p"].path == "ghost"
    assert_exact(model, x, y, method="ghost")
    assert found and all((r is None) == (use == "in_place_flow") for r in found)


def test_an_expanded_parameter_is_exact() -> None:
    torch.manual_seed(0)
    model = Uses("expand").double()
    x, y = data()
    assert ghost_plan(model, x)["p"].path == "ghost"
    assert_exact(model, x, y, method="ghost")


def test_a_parameter_the_forward_returns_stays_on_vmap() -> None:
    torch.manual_seed(0)
    model = Uses("returned").double()
    x, _ = data()
    assert ghost_plan(model, x, output="logits")["p"].path == "vmap"
    assert ghost_plan(model, x, output="logits")["q"].path == "ghost"


def test_a_random_flow_stays_on_vmap() -> None:
    torch.manual_seed(0)
    model = Uses("dropout").double()
    x, _ = data()
    plan = ghost_plan(model, x, randomness="different")
    assert plan["p"].path == "vmap", plan["p"]
    assert plan["q"].path == "ghost", plan["q"]


def test_a_forward_that_differs_from_its_plan_falls_back_exactly() -> None:
    torch.manual_seed(0)
    model = Uses("switches").double()
    x, y = data()
    assert ghost_plan(model, x)["p"].path == "ghost"
    model.switched = True
    assert_exact(model, x, y)


def test_broadcasts_with_one_example_are_exact() -> None:
    model, x, y = make_forms("broadcasts", batch=1, tokens=5)
    assert all(e.path == "ghost" for e in ghost_plan(model, x).values())
    assert_exact(model, x, y, method="ghost")
