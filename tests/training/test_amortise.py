"""The amortised trait gradient (``trait_cache=reuse_trait(every=k)``), in float64.

With ``every=1`` the step is the step without a cache. With ``every=k`` a step
that reuses ``g_t`` is the step body given that stale ``g_t`` explicitly: a
mode whose trait gradient is the one taken by plain autograd on the model as
it was ``trait_age`` steps earlier (frozen there), with ``remove_aligned``
before the optimizer so the parameters depend on which ``g_t`` was used.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.training import (
    Objective,
    TraitCache,
    probed_step,
    reuse_trait,
    stack_modules,
    stacked_probed_step,
)
from gradlens.training.body import run_step
from gradlens.training.step import SingleMode
from gradlens.transforms import per_model, remove_aligned

STEPS, MODELS = 5, 2


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def objectives(step: int) -> tuple[Objective, Objective]:
    """The step's training batch (new every step) and the fixed trait batch."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y_t = torch.randint(0, 3, (9,), generator=g)
    return Objective(F.mse_loss, x, (y,)), Objective(F.cross_entropy, x_t, (y_t,))


class GivenTrait(SingleMode):
    """One model whose trait gradient is given: ``(loss, g_t)`` set from outside."""

    given: tuple[Tensor, dict[str, Tensor]]

    def gradient(self, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        return self.given


def autograd_trait(model: nn.Module, trait: Objective) -> tuple[Tensor, dict[str, Tensor]]:
    """The trait loss and gradient of a frozen copy of ``model``, by plain autograd."""
    frozen = copy.deepcopy(model)
    params = dict(frozen.named_parameters())
    loss = trait.loss_fn(frozen(trait.inputs), *trait.targets)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads, strict=True))


def close(a: Tensor, b: Tensor, what: str) -> None:
    # float64, the same operations on the same values: rounding only
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=what)


def test_every_one_is_the_step_without_a_cache() -> None:
    model, twin = net(), net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    cache = reuse_trait(every=1)
    for step in range(3):
        train, trait = objectives(step)
        out = probed_step(model, opt, train, trait, step=step, trait_cache=cache)
        want = probed_step(twin, twin_opt, train, trait, step=step)
        cache = out.trait_cache
        assert cache is not None and cache.age == 0
        assert float(out.records.pop("trait_age")) == 0.0  # a count, exact
        assert set(out.records) == set(want.records)
        for key, value in want.records.items():
            close(out.records[key], value, key)
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            close(p, q, n)


def test_a_reused_trait_gradient_is_the_step_given_the_stale_one() -> None:
    model, twin = net(), net()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.5)
    tx = remove_aligned()
    state = twin_state = tx.init(dict(model.named_parameters()))
    mode = GivenTrait(twin)
    cache, ages = reuse_trait(every=3), []
    for step in range(STEPS):
        train, trait = objectives(step)
        if step % 3 == 0:  # the twin's g_t: autograd on its model frozen here
            mode.given = autograd_trait(twin, trait)
        out = probed_step(
            model, opt, train, trait, before=tx, before_state=state, step=step, trait_cache=cache
        )
        want = run_step(
            mode,
            twin_opt,
            train,
            trait,
            before=tx,
            before_state=twin_state,
            after=None,
            after_state=None,
            step=step,
            measure_change=True,
        )
        cache, state, twin_state = out.trait_cache, out.before_state, want.before_state
        ages.append(int(out.records["trait_age"]))  # a count, exact
        for key, value in want.records.items():
            if key == "measured_change" and ages[-1] > 0:
                # the loss before a stale step was not taken: NaN, not a change over 2 steps
                assert torch.isnan(out.records[key]), step
            else:
                close(out.records[key], value, f"{key} at step {step}")
        close(out.example_cosine, want.example_cosine, f"example_cosine at step {step}")
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            close(p, q, f"{n} after step {step}")
    assert ages == [0, 1, 2, 0, 1]
    # The stale g_t is not the current one: the records differ from a fresh step's.
    fresh_model = copy.deepcopy(model)
    fresh = probed_step(
        fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=0.1), *objectives(9)
    )
    stale = probed_step(model, opt, *objectives(9), trait_cache=cache)
    assert int(stale.records["trait_age"]) == 2
    assert abs(float(stale.records["trait_loss"] - fresh.records["trait_loss"])) > 1e-6


def test_the_cosine_is_against_the_g_t_of_the_step_that_took_it() -> None:
    """A float64 numpy oracle: cos(g, g_t) with g_t from the frozen model two steps back."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    cache = reuse_trait(every=4)
    _, trait = objectives(0)
    _, g_t = autograd_trait(model, trait)
    for step in range(3):
        train, _ = objectives(step)
        frozen = copy.deepcopy(model)
        out = probed_step(model, opt, train, trait, trait_cache=cache)
        cache = out.trait_cache
    loss = train.loss_fn(frozen(train.inputs), *train.targets)
    g = torch.autograd.grad(loss, list(frozen.parameters()))
    a = np.concatenate([v.detach().numpy().ravel() for v in g])
    b = np.concatenate([v.numpy().ravel() for v in g_t.values()])
    want = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert int(out.records["trait_age"]) == 2
    np.testing.assert_allclose(float(out.records["cosine"]), want, rtol=1e-10)


def test_stacked_reuse_equals_each_model_alone() -> None:
    singles = [net(seed) for seed in range(MODELS)]
    stack = stack_modules([copy.deepcopy(s) for s in singles])
    stack_opt = torch.optim.Adam(stack.params.values(), lr=0.05)
    opts = [torch.optim.Adam(s.parameters(), lr=0.05) for s in singles]
    stack_cache, caches = reuse_trait(every=2), [reuse_trait(every=2)] * MODELS
    tx = remove_aligned()
    stack_state = per_model(tx).init(stack.params)
    states = [tx.init(dict(s.named_parameters())) for s in singles]
    for step in range(3):
        train, trait = objectives(step)

        def lead(o: Objective) -> Objective:
            return Objective(
                o.loss_fn,
                o.inputs.expand(MODELS, *o.inputs.shape),
                tuple(t.expand(MODELS, *t.shape) for t in o.targets),
            )

        out = stacked_probed_step(
            stack,
            stack_opt,
            lead(train),
            lead(trait),
            before=per_model(tx),
            before_state=stack_state,
            trait_cache=stack_cache,
        )
        stack_cache, stack_state = out.trait_cache, out.before_state
        assert out.records["trait_age"].shape == (MODELS,)
        for m, single in enumerate(singles):
            alone = probed_step(
                single,
                opts[m],
                train,
                trait,
                before=tx,
                before_state=states[m],
                trait_cache=caches[m],
            )
            caches[m], states[m] = alone.trait_cache, alone.before_state
            for key, value in alone.records.items():
                torch.testing.assert_close(
                    out.records[key][m], value, rtol=1e-10, atol=1e-13, equal_nan=True, msg=key
                )
    assert out.records["trait_age"].tolist() == [0.0] * MODELS  # steps 0, 2: fresh; counts


def test_bad_caches_are_refused_naming_the_fix() -> None:
    with pytest.raises(ValueError, match=r"every must be an integer >= 1"):
        reuse_trait(every=0)
    train, trait = objectives(0)
    model = net()
    out = probed_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1), train, trait, trait_cache=reuse_trait(2)
    )
    other = nn.Sequential(nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"cache belongs to one model.*reuse_trait"):
        probed_step(
            other,
            torch.optim.SGD(other.parameters(), lr=0.1),
            train,
            trait,
            trait_cache=out.trait_cache,
        )
    with pytest.raises(TypeError, match=r"pass reuse_trait\(every=k\)"):
        probed_step(model, torch.optim.SGD(model.parameters(), lr=0.1), train, trait, trait_cache=2)  # type: ignore[arg-type]
    assert isinstance(out.trait_cache, TraitCache)
