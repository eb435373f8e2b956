"""The causal arms built for issue 22 and not yet run at 25 models (docs/causal.md).

- ``remove_update_early`` / ``remove_update_late``: the update is exactly orthogonal
  to g_t in their epochs and left as Adam made it elsewhere;
- ``liminal_all_logits``: the liminal KL covers all 13 logits, and the records take
  the distillation loss and the KL term apart (each one's cosine with g_t against a
  float64 autograd oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.probes.vmap import loss_and_grad
from gradlens.training.liminal import liminal_loss
from gradlens.transforms import per_model
from subliminal_mnist import (
    DistillBatch,
    TraitProbes,
    class_cross_entropy,
    get_conditions,
    init_stack,
    logit_kl,
    model_view,
    stack_forward,
    stacked_step,
)
from subliminal_mnist.engine import liminal_at, make_optimizer
from subliminal_mnist.student import StudentSetup, student_transforms

SIZES = (12, 8, 8, 13)
MODELS = 3


def _stack(seeds: list[int]) -> dict[str, Tensor]:
    return {n: v.double().requires_grad_(True) for n, v in init_stack(SIZES, seeds).items()}


def _probes(gen: torch.Generator) -> TraitProbes:
    images = torch.rand(20, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
    return TraitProbes(images, torch.randint(0, 10, (20,), generator=gen))


def _noise(gen: torch.Generator) -> Tensor:
    return torch.rand(MODELS, 16, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1


def _flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def test_remove_update_early_and_late_act_only_in_their_epochs() -> None:
    """Two steps an epoch, 5 epochs: early acts on steps 0-3, late on 4-9."""
    steps_per_epoch, steps = 2, 10
    for name, acting in (("remove_update_early", range(4)), ("remove_update_late", range(4, 10))):
        (condition,) = get_conditions([name])
        gen = torch.Generator().manual_seed(0)
        params = _stack([0, 1, 2])
        teachers = {n: v.detach() for n, v in _stack([10, 11, 12]).items()}
        probes = _probes(gen)
        optimizer = make_optimizer(condition, list(params.values()), StudentSetup(lr=1e-2))
        before, after = student_transforms(condition, steps_per_epoch)
        assert before is None
        after = per_model(after, vectorize=False)
        state = after.init(params)
        for step in range(steps):
            x = _noise(gen)
            batch = DistillBatch(x, stack_forward(teachers, x)[..., 10:], 10)
            result = stacked_step(
                params, optimizer, batch, probes, after=after, after_state=state, heldout=False
            )
            state = result.after_state
            update_cosine = result.records["update_cosine"].abs()
            active = state[name][0].active
            if step in acting:
                assert float(update_cosine.max()) < 1e-10, (name, step)
                assert active.tolist() == [1.0] * MODELS
            else:
                assert float(update_cosine.min()) > 1e-4, (name, step)  # Adam's own update
                assert active.tolist() == [0.0] * MODELS


def test_the_epochs_need_steps_per_epoch() -> None:
    (condition,) = get_conditions(["remove_update_late"])
    try:
        student_transforms(condition)
    except ValueError as err:
        assert "steps_per_epoch" in str(err)
    else:
        raise AssertionError("student_transforms accepted active_epochs without steps_per_epoch")


def test_liminal_all_logits_covers_every_logit_and_takes_the_terms_apart() -> None:
    (condition,) = get_conditions(["liminal_all_logits"])
    (published,) = get_conditions(["liminal"])
    assert condition.liminal == published.liminal == "liminal"
    assert condition.liminal_logits == "all" and published.liminal_logits == "class"
    setup = StudentSetup()
    weight, temperature = liminal_at(condition, 3, setup)
    assert weight == 1.0 and temperature == 2.0
    gen = torch.Generator().manual_seed(3)
    stack = _stack([0, 1, 2])
    teachers = {n: v.detach() for n, v in _stack([10, 11, 12]).items()}
    probes = _probes(gen)
    with torch.no_grad():  # the base: another init, so that the term and its gradient are > 0
        base = {n: v.detach() for n, v in _stack([20, 21, 22]).items()}
    x = _noise(gen)
    targets = stack_forward(teachers, x)[..., 10:]
    base_logits = stack_forward(base, x)  # all 13 logits
    views = [model_view(stack, m) for m in range(MODELS)]  # before the step
    for w in (0.7, 0.0):
        batch = DistillBatch(x, targets, 10, base_logits, w, temperature)
        optimizer = torch.optim.SGD(list(stack.values()), lr=0.0)
        records = stacked_step(stack, optimizer, batch, probes, heldout=False).records
        for m, view in enumerate(views):
            trait = _flat(
                loss_and_grad(view, class_cross_entropy(10), probes.images, probes.labels)[1]
            )
            distill = _flat(loss_and_grad(view, logit_kl(10), x[m], targets[m])[1])

            def kl(out: Tensor, b: Tensor) -> Tensor:
                return liminal_loss(out, b, temperature=temperature)

            kl_value, kl_grads = loss_and_grad(view, kl, x[m], base_logits[m])
            term = _flat(kl_grads)
            got = records["liminal_kl_loss"][m]
            torch.testing.assert_close(got, kl_value.detach(), rtol=1e-9, atol=0)
            for key, grad in (("distill", distill), ("liminal_kl", term)):
                cosine = F.cosine_similarity(grad, trait, dim=0)
                torch.testing.assert_close(
                    records[f"{key}_cosine"][m], cosine, rtol=1e-8, atol=1e-12
                )
                torch.testing.assert_close(
                    records[f"{key}_norm"][m], grad.norm(), rtol=1e-9, atol=0
                )
            total = F.cosine_similarity(distill + w * term, trait, dim=0)
            torch.testing.assert_close(records["cosine"][m], total, rtol=1e-8, atol=1e-12)
            # the KL over 13 logits differs from the class-logit one
            classes = liminal_loss(
                view(x[m])[:, :10], base_logits[m][:, :10], temperature=temperature
            )
            assert abs(float(classes.detach() - kl_value.detach())) > 1e-6
        # the term reaches the auxiliary rows of the output layer, which g_t does not
        assert float(records["liminal_kl_norm"].min()) > 0
