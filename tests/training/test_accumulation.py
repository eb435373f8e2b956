"""Gradient accumulation: k micro-batches, one optimizer step, equal to the full batch (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, probed_step, stack_modules, stacked_probed_step
from gradlens.training import step_values, transform_layout
from gradlens.transforms import named_chain, per_model, remove_aligned_per_example, scale_aligned

SIZES = [3, 2, 4]  # micro-batches of unequal sizes: the mean must weigh by examples


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(SIZES), 5, generator=gen, dtype=torch.float64)
    t = torch.randn(sum(SIZES), 3, generator=gen, dtype=torch.float64)
    px = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    py = torch.randint(0, 3, (10,), generator=gen)
    return x, t, px, py


def split(x: Tensor, t: Tensor) -> list[Objective]:
    bounds = torch.tensor([0, *SIZES]).cumsum(0).tolist()
    return [
        Objective(F.mse_loss, x[a:b], (t[a:b],), parts={"mse": F.mse_loss})
        for a, b in itertools.pairwise(bounds)
    ]


BEFORE = named_chain(("remove", remove_aligned_per_example(only_positive=True)))
AFTER = named_chain(("half", scale_aligned(0.5)))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_micro_batches_equal_the_full_batch_step(optimizer: type) -> None:
    x, t, px, py = data()
    whole, parts = net(), net()
    trait = Objective(F.cross_entropy, px, (py,))
    results = []
    for model, train in (
        (whole, Objective(F.mse_loss, x, (t,), parts={"mse": F.mse_loss})),
        (parts, split(x, t)),
    ):
        params = dict(model.named_parameters())
        out = probed_step(
            model,
            optimizer(model.parameters(), lr=0.1),
            train,
            trait,
            before=BEFORE,
            before_state=BEFORE.init(params),
            after=AFTER,
            after_state=AFTER.init(params),
            momentum=True,
        )
        results.append(
            step_values(out, transform_layout(params, BEFORE, AFTER))
            | {"example_cosine": out.example_cosine}
        )
    assert results[0].keys() == results[1].keys()
    for key, value in results[0].items():
        torch.testing.assert_close(
            results[1][key], value, rtol=1e-9, atol=1e-12, equal_nan=True, msg=key
        )
    for p, q in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-13)
    state = results[0]["transform_acted"]
    assert 0 < float(state[0, 0, 0]) < 1  # the per-example removal acted on some examples only


def test_stacked_micro_batches_equal_the_full_batch_step() -> None:
    x, t, px, py = data()
    models = 2
    xs, ts = x.expand(models, *x.shape), t.expand(models, *t.shape)
    trait = Objective(F.cross_entropy, px.expand(models, *px.shape), (py.expand(models, 10),))
    outs, stacks = [], []
    for micro in (False, True):
        stack = stack_modules([net(s) for s in range(models)])
        if micro:
            train = [
                Objective(
                    F.mse_loss,
                    o.inputs.expand(models, *o.inputs.shape),
                    (o.targets[0].expand(models, *o.targets[0].shape),),
                )
                for o in split(x, t)
            ]
        else:
            train = Objective(F.mse_loss, xs, (ts,))
        tx = per_model(remove_aligned_per_example())
        outs.append(
            stacked_probed_step(
                stack,
                torch.optim.Adam(stack.params.values(), lr=0.1),
                train,
                trait,
                before=tx,
                before_state=tx.init(stack.params),
            )
        )
        stacks.append(stack)
    for key, value in outs[0].records.items():
        torch.testing.assert_close(outs[1].records[key], value, rtol=1e-9, atol=1e-12, msg=key)
    torch.testing.assert_close(outs[1].example_cosine, outs[0].example_cosine)
    for name, p in stacks[0].params.items():
        torch.testing.assert_close(stacks[1].params[name], p, rtol=1e-10, atol=1e-13)


def test_a_bad_micro_batch_is_named() -> None:
    x, t, px, py = data()
    model = net()
    bad = [*split(x, t), Objective(F.mse_loss, x[:2], (t[:3],))]
    with pytest.raises(ValueError, match=r"train\[3\]"):
        probed_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            bad,
            Objective(F.cross_entropy, px, (py,)),
        )
    with pytest.raises(TypeError, match="micro-batches"):
        probed_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            [],
            Objective(F.cross_entropy, px, (py,)),
        )
