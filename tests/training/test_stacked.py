"""M stacked models equal M single-model probed steps, record by record (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.errors import UnsupportedModelError
from gradlens.training import (
    Objective,
    probed_step,
    stack_forward,
    stack_modules,
    stacked_probed_step,
    step_values,
    transform_layout,
    unstack,
)
from gradlens.transforms import (
    named_chain,
    per_model,
    remove_aligned,
    remove_aligned_per_example,
    scale_aligned,
)

MODELS, EXAMPLES, TRAIT = 3, 6, 9


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def normed() -> nn.Module:  # not an MLP: takes the vmap path
    return nn.Sequential(
        nn.Linear(5, 6, bias=False), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 4)
    ).double()


def kl(out: Tensor, target: Tensor) -> Tensor:
    p = F.log_softmax(target, -1)
    return (p.exp() * (p - F.log_softmax(out, -1))).sum(-1).mean()


def distill(out: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    return kl(out, target) + 0.3 * F.cross_entropy(out, labels)


def first_part(out: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    del labels
    return kl(out, target)


def batches(step: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "x": torch.randn(MODELS, EXAMPLES, 5, generator=g, dtype=torch.float64),
        "target": torch.randn(MODELS, EXAMPLES, 4, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, 4, (MODELS, EXAMPLES), generator=g),
        "probe": torch.randn(TRAIT, 5, generator=g, dtype=torch.float64),
        "probe_labels": torch.randint(0, 4, (TRAIT,), generator=g),
        "heldout": torch.randn(TRAIT, 5, generator=g, dtype=torch.float64),
        "shuffled": torch.randint(0, 4, (TRAIT,), generator=g),
    }


def objectives(b: dict[str, Tensor], m: int | None) -> dict[str, Objective]:
    """Model m's objectives, or the stacked ones (m is None)."""

    def one(x: Tensor, *t: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        if m is None:
            return x.expand(MODELS, *x.shape), tuple(v.expand(MODELS, *v.shape) for v in t)
        return x, t

    def own(x: Tensor, *t: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return (x, t) if m is None else (x[m], tuple(v[m] for v in t))

    x, t = own(b["x"], b["target"], b["labels"])
    px, pt = one(b["probe"], b["probe_labels"])
    hx, ht = one(b["heldout"], b["probe_labels"])
    rx, rt = one(b["probe"], b["shuffled"])
    return {
        "train": Objective(distill, x, t, parts={"kl": first_part}),
        "trait": Objective(F.cross_entropy, px, pt),
        "heldout": Objective(F.cross_entropy, hx, ht),
        "reference": Objective(F.cross_entropy, rx, rt),
    }


CASES = {
    "plain": {},
    "remove_per_example_then_scale_update": {
        "before": named_chain(("remove", remove_aligned_per_example())),
        "after": named_chain(("half", scale_aligned(0.5, scope="layer"))),
    },
    "remove_along_shuffled_reference": {"before": remove_aligned(), "reference": True},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("build", "method"), [(mlp, "matmul"), (mlp, "vmap"), (normed, "auto")])
def test_stacked_equals_each_model_alone(case: str, build: type, method: str) -> None:
    options = CASES[case]
    singles = []
    for seed in range(MODELS):
        torch.manual_seed(seed)
        singles.append(build())
    stack = stack_modules([copy.deepcopy(s) for s in singles])
    stacked_opt = torch.optim.Adam(stack.params.values(), lr=0.05)
    opts = [torch.optim.Adam(s.parameters(), lr=0.05) for s in singles]
    before, after = options.get("before"), options.get("after")
    wrapped = {k: per_model(v) for k, v in (("before", before), ("after", after)) if v is not None}
    states = {k: v.init(stack.params) for k, v in wrapped.items()}
    single_states = [
        {
            k: v.init(dict(s.named_parameters()))
            for k, v in (("before", before), ("after", after))
            if v is not None
        }
        for s in singles
    ]
    params = dict(singles[0].named_parameters())
    layout = transform_layout(params, before, after)
    for step in range(2):
        b = batches(step)
        o = objectives(b, None)
        out = stacked_probed_step(
            stack,
            stacked_opt,
            o["train"],
            o["trait"],
            before=wrapped.get("before"),
            before_state=states.get("before"),
            after=wrapped.get("after"),
            after_state=states.get("after"),
            method=method,
            heldout=o["heldout"],
            reference=o["reference"] if options.get("reference") else None,
            momentum=True,
            part_gradients=True,
        )
        states = {"before": out.before_state, "after": out.after_state}
        stacked_row = step_values(out, layout)
        for m, single in enumerate(singles):
            o = objectives(b, m)
            ref = probed_step(
                single,
                opts[m],
                o["train"],
                o["trait"],
                before=before,
                before_state=single_states[m].get("before"),
                after=after,
                after_state=single_states[m].get("after"),
                heldout=o["heldout"],
                reference=o["reference"] if options.get("reference") else None,
                momentum=True,
                part_gradients=True,
            )
            single_states[m] = {"before": ref.before_state, "after": ref.after_state}
            single_row = step_values(ref, layout)
            assert stacked_row.keys() == single_row.keys()
            for name, value in single_row.items():
                torch.testing.assert_close(
                    stacked_row[name][m].double(),
                    value.double(),
                    rtol=1e-7,
                    atol=1e-9,
                    equal_nan=True,
                    msg=lambda text, name=name: f"{name}: {text}",
                )
            torch.testing.assert_close(out.example_cosine[m], ref.example_cosine)
            for name, p in single.named_parameters():
                torch.testing.assert_close(stack.params[name][m], p, rtol=1e-9, atol=1e-12)


def test_records_are_not_degenerate() -> None:
    """The equivalence above compares values that move: nonzero, varied across models."""
    torch.manual_seed(0)
    stack = stack_modules([mlp() for _ in range(MODELS)])
    o = objectives(batches(0), None)
    out = stacked_probed_step(
        stack, torch.optim.SGD(stack.params.values(), lr=0.1), o["train"], o["trait"]
    )
    cos = out.records["cosine"]
    assert (cos.abs() > 1e-3).all() and cos.std() > 1e-3
    assert out.example_cosine.std() > 1e-2
    assert out.records["train_loss_part"].shape == (MODELS, 1)


def test_unstack_and_forward_match_the_modules() -> None:
    torch.manual_seed(0)
    nets = [normed() for _ in range(MODELS)]
    stack = stack_modules(nets)
    x = torch.randn(MODELS, EXAMPLES, 5, dtype=torch.float64)
    for m, net in enumerate(nets):
        torch.testing.assert_close(stack_forward(stack, x)[m], net(x[m]))
        torch.testing.assert_close(unstack(stack, m)(x[m]), net(x[m]))


def test_refusals_name_the_fix() -> None:
    torch.manual_seed(0)
    stack = stack_modules([mlp() for _ in range(MODELS)])
    opt = torch.optim.SGD(stack.params.values(), lr=0.1)
    o = objectives(batches(0), None)
    with pytest.raises(TypeError, match=r"per_model\(before\)"):
        stacked_probed_step(
            stack,
            opt,
            o["train"],
            o["trait"],
            before=remove_aligned(),
            before_state=remove_aligned().init(stack.params),
        )
    flat = Objective(F.cross_entropy, o["trait"].inputs[0], (o["trait"].targets[0][0],))
    with pytest.raises(ValueError, match="model, example"):
        stacked_probed_step(stack, opt, o["train"], flat)
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold"):
        stacked_probed_step(stack, other, o["train"], o["trait"])
    summed = (
        Objective(
            lambda out, t, y: kl(out, t) * out.shape[0],
            *o["train"].inputs[None],
            o["train"].targets,
        )
        if False
        else None
    )
    del summed
    with pytest.raises(UnsupportedModelError, match="matmul"):
        stacked_probed_step(
            stack_modules([normed() for _ in range(2)]),
            opt,
            o["train"],
            o["trait"],
            method="matmul",
        )


def test_a_summed_loss_is_refused_on_the_stack() -> None:
    torch.manual_seed(0)
    stack = stack_modules([mlp() for _ in range(MODELS)])
    opt = torch.optim.SGD(stack.params.values(), lr=0.1)
    o = objectives(batches(0), None)

    def summed(out: Tensor, target: Tensor, labels: Tensor) -> Tensor:
        return distill(out, target, labels) * out.shape[0]

    train = Objective(summed, o["train"].inputs, o["train"].targets)
    with pytest.raises(ValueError, match="reduction='sum'"):
        stacked_probed_step(stack, opt, train, o["trait"])
