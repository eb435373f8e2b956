"""Many models at once equal each model trained alone, step for step (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from gradlens.probes.vmap import LossFn, loss_and_grad
from gradlens.training import Objective, probed_step, weighted_sum
from gradlens.training.liminal import liminal_loss
from gradlens.transforms import per_model
from subliminal_mnist import (
    Digits,
    DistillBatch,
    NoiseStream,
    TraitProbes,
    accuracy,
    class_cross_entropy,
    evaluate_stack,
    get_conditions,
    init_mlp,
    init_stack,
    logit_kl,
    model_view,
    noise_batch,
    stack_forward,
    stacked_step,
    train_classifier,
    train_teacher_stack,
)
from subliminal_mnist.engine import make_optimizer
from subliminal_mnist.student import StudentSetup, student_transforms

SIZES = (12, 8, 8, 13)
SEEDS = [0, 1, 2]
TRANSFORMED = [
    "remove",
    "reverse",
    "remove_layer",
    "remove_per_example",
    "remove_update",
    "remove_update_early",
    "remove_update_late",
    "remove_support",
    "scale_update_0.5",
]


def _stack(seeds: list[int]) -> dict[str, torch.Tensor]:
    return {n: v.double().requires_grad_(True) for n, v in init_stack(SIZES, seeds).items()}


def _class_slice(num_classes: int) -> LossFn:
    """The one-model liminal term (T = 1) on the first ``num_classes`` logits.

    ``loss(outputs, base_logits)``.
    """

    def loss(outputs: Tensor, base_logits: Tensor) -> Tensor:
        return liminal_loss(outputs[:, :num_classes], base_logits, temperature=1.0)

    return loss


def _probes(gen: torch.Generator) -> TraitProbes:
    images = torch.rand(20, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 10, (20,), generator=gen)
    return TraitProbes(images, labels)


@pytest.mark.parametrize(
    "name", ["aux", "all_logits", *TRANSFORMED, "sgd", "sgd_momentum", "adam_beta1_0"]
)
def test_a_stacked_model_equals_the_same_model_trained_alone(name: str) -> None:
    """Every record of probed_step, the per-example cosines and the parameters, 4 steps."""
    (condition,) = get_conditions([name])
    setup = StudentSetup(lr=1e-2, sgd_lr=0.5)  # large steps: differences would show
    gen = torch.Generator().manual_seed(0)
    stack = _stack(SEEDS)
    teachers = {n: v.detach() for n, v in _stack([10, 11, 12]).items()}
    optimizer = make_optimizer(condition, list(stack.values()), setup)
    singles = [init_mlp(SIZES, seed=s).double() for s in SEEDS]
    single_opts = [make_optimizer(condition, list(m.parameters()), setup) for m in singles]
    # one step an epoch: remove_update_early acts on steps 0 and 1, _late on 2 and 3
    before, after = student_transforms(condition, steps_per_epoch=1)
    one = {n: v[0] for n, v in stack.items()}
    single_b = [before.init(one) if before else None for _ in SEEDS]
    single_a = [after.init(one) if after else None for _ in SEEDS]
    stacked_before = per_model(before) if before else None
    stacked_after = per_model(after) if after else None
    b_state = stacked_before.init(stack) if stacked_before else None
    a_state = stacked_after.init(stack) if stacked_after else None
    probes = _probes(gen)
    first = 10 if condition.logits == "aux" else 0
    trait = Objective(class_cross_entropy(10), probes.images, (probes.labels,))
    for _ in range(4):
        x = torch.rand(3, 16, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
        targets = stack_forward(teachers, x)[..., first:]
        result = stacked_step(
            stack,
            optimizer,
            DistillBatch(x, targets, first),
            probes,
            before=stacked_before,
            before_state=b_state,
            after=stacked_after,
            after_state=a_state,
            heldout=False,
        )
        b_state, a_state = result.before_state, result.after_state
        for m, model in enumerate(singles):
            alone = probed_step(
                model,
                single_opts[m],
                Objective(logit_kl(first), x[m], (targets[m],)),
                trait,
                before=before,
                before_state=single_b[m],
                after=after,
                after_state=single_a[m],
            )
            single_b[m], single_a[m] = alone.before_state, alone.after_state
            for key, value in alone.records.items():
                # probed_step summarises per-example cosines in float32
                tol = 1e-6 if key.startswith("example_cosine") else 1e-10
                torch.testing.assert_close(
                    result.records[key][m], value.double(), atol=tol, rtol=tol, msg=key
                )
            torch.testing.assert_close(result.example_cosine[m], alone.example_cosine)
            for stacked_state, state in ((b_state, single_b[m]), (a_state, single_a[m])):
                if state is not None:
                    mine = pytree.tree_leaves(
                        pytree.tree_map_only(Tensor, lambda t, m=m: t[m], stacked_state)
                    )
                    for got, want in zip(mine, pytree.tree_leaves(state), strict=True):
                        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-10, rtol=1e-8)
            for pname, p in model.named_parameters():
                torch.testing.assert_close(stack[pname][m], p, atol=1e-12, rtol=0)
    assert float(result.records["cosine"].abs().max()) > 0  # not a vacuous comparison


def test_liminal_term_equals_the_single_model_weighted_loss() -> None:
    gen = torch.Generator().manual_seed(1)
    stack = _stack(SEEDS)
    base = {n: v.detach().clone() for n, v in stack.items()}
    teachers = {n: v.detach() for n, v in _stack([10, 11, 12]).items()}
    optimizer = torch.optim.Adam(list(stack.values()), lr=1e-2)
    singles = [init_mlp(SIZES, seed=s).double() for s in SEEDS]
    bases = [init_mlp(SIZES, seed=s).double() for s in SEEDS]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in singles]
    probes = _probes(gen)
    trait = Objective(class_cross_entropy(10), probes.images, (probes.labels,))
    for weight in (1.0, 0.5):
        x = torch.rand(3, 16, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
        targets = stack_forward(teachers, x)[..., 10:]
        base_logits = stack_forward(base, x)[..., :10]
        batch = DistillBatch(x, targets, 10, base_logits, weight, 1.0)
        result = stacked_step(stack, optimizer, batch, probes, heldout=False)
        for m, model in enumerate(singles):
            with torch.no_grad():
                own_base = bases[m](x[m])[:, :10]
            torch.testing.assert_close(own_base, base_logits[m])
            loss = weighted_sum(logit_kl(10), _class_slice(10), weight, 1)
            alone = probed_step(
                model, opts[m], Objective(loss, x[m], (targets[m], own_base)), trait
            )
            torch.testing.assert_close(result.records["train_loss"][m], alone.records["train_loss"])
            if weight < 1:  # after a step the student has left its base: the term is > 0
                liminal = result.records["train_loss"][m] - result.records["distill_loss"][m]
                assert float(liminal) > 1e-8
            for pname, p in model.named_parameters():
                torch.testing.assert_close(stack[pname][m], p, atol=1e-12, rtol=0)


def test_the_shuffled_reference_is_removed_and_the_probes_keep_the_true_trait() -> None:
    gen = torch.Generator().manual_seed(2)
    (condition,) = get_conditions(["remove_shuffled"])
    stack = _stack(SEEDS)
    teachers = {n: v.detach() for n, v in _stack([10, 11, 12]).items()}
    probes = _probes(gen)
    shuffled = probes.labels[torch.randperm(20, generator=gen)]
    probes = probes._replace(shuffled_labels=shuffled)
    before = per_model(student_transforms(condition)[0])
    state = before.init(stack)
    views = [model_view(stack, m) for m in range(3)]  # at the parameters before the step
    shuffled_grads = [
        loss_and_grad(v, class_cross_entropy(10), probes.images, shuffled)[1] for v in views
    ]
    x = torch.rand(3, 16, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
    targets = stack_forward(teachers, x)[..., 10:]
    raw_grads = [loss_and_grad(v, logit_kl(10), x[m], targets[m])[1] for m, v in enumerate(views)]
    optimizer = torch.optim.SGD(list(stack.values()), lr=1.0)
    old = {n: v.detach().clone() for n, v in stack.items()}
    result = stacked_step(
        stack,
        optimizer,
        DistillBatch(x, targets, 10),
        probes,
        before=before,
        before_state=state,
        use_shuffled_reference=True,
        heldout=False,
    )
    for m in range(3):
        applied = {n: old[n][m] - stack[n][m].detach() for n in old}  # SGD, lr 1: the gradient
        along = sum((applied[n] * shuffled_grads[m][n]).sum() for n in applied)
        assert abs(float(along)) < 1e-12
        raw = sum((raw_grads[m][n] * shuffled_grads[m][n]).sum() for n in applied)
        assert abs(float(raw)) > 1e-6  # there was something to remove
    # the probes measure the true trait gradient: the applied gradient is not orthogonal to it
    assert float(result.records["applied_cosine"].abs().min()) > 1e-6


def test_stacked_teachers_equal_train_classifier() -> None:
    gen = torch.Generator().manual_seed(3)
    digits = Digits(
        torch.rand(50, SIZES[0], generator=gen) * 2 - 1, torch.randint(0, 10, (50,), generator=gen)
    )
    seeds = [4, 5]
    stack = {n: v.double() for n, v in init_stack(SIZES, seeds).items()}
    double = Digits(digits.images.double(), digits.labels)
    trained = train_teacher_stack(
        stack, double, seeds=seeds, epochs=2, batch_size=16, lr=1e-2, progress=False
    )
    for m, s in enumerate(seeds):
        alone = train_classifier(
            init_mlp(SIZES, seed=s).double(),
            double,
            epochs=2,
            batch_size=16,
            lr=1e-2,
            seed=s,
            progress=False,
        )
        for name, p in alone.named_parameters():
            torch.testing.assert_close(trained[name][m], p.detach(), atol=1e-12, rtol=0)
        metrics = evaluate_stack(trained, double)
        assert float(metrics["test_accuracy"][m]) == accuracy(alone, double)
        logits = alone(double.images)[:, :10].detach()
        loss = torch.nn.functional.cross_entropy(logits, double.labels)
        torch.testing.assert_close(metrics["test_loss"][m], loss)
        p = torch.softmax(logits, -1)
        torch.testing.assert_close(metrics["test_entropy"][m], -(p * p.log()).sum(-1).mean())
        share = torch.bincount(logits.argmax(-1), minlength=10).max() / 50
        torch.testing.assert_close(metrics["test_majority"][m], share.double())


def test_fixed_noise_reuses_each_models_set_every_epoch_and_fresh_noise_does_not() -> None:
    fixed = NoiseStream.create("fixed", seeds=[0, 1], size=30, batch_size=8, dim=5)
    epochs = [torch.cat(list(fixed.batches(e)), dim=1) for e in range(3)]
    assert epochs[0].shape == (2, 30, 5)
    for m in range(2):
        rows = [set(map(tuple, e[m].tolist())) for e in epochs]
        assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 30
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled
    assert set(map(tuple, epochs[0][0].tolist())).isdisjoint(map(tuple, epochs[0][1].tolist()))
    again = NoiseStream.create("fixed", seeds=[0, 1], size=30, batch_size=8, dim=5)
    assert torch.equal(torch.cat(list(again.batches(1)), dim=1), epochs[1])
    assert float(epochs[0].min()) > -1 and float(epochs[0].max()) < 1
    fresh = NoiseStream.create("fresh", seeds=[3, 4], size=30, batch_size=8, dim=5)
    batch = next(iter(fresh.batches(2)))
    assert torch.equal(batch[1], noise_batch(4, 2, 0, 8, 5))
    one, two = (torch.cat(list(fresh.batches(e)), dim=1) for e in (0, 1))
    assert set(map(tuple, one[0].tolist())).isdisjoint(map(tuple, two[0].tolist()))


def test_fixed_noise_is_uniform_on_minus_one_one() -> None:
    stream = NoiseStream.create("fixed", seeds=[7], size=2000, batch_size=2000, dim=100)
    values = next(iter(stream.batches(0))).flatten()
    assert abs(float(values.mean())) < 0.005  # 200k uniforms: standard error 1.3e-3
    assert abs(float(values.var()) - 1 / 3) < 0.005
    assert float(values.min()) < -0.999 and float(values.max()) > 0.999


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_stacked_liminal_term_is_the_published_loss_per_model(temperature: float) -> None:
    """``T^2 KL(base/T || student/T)`` per model equals gradlens.training.liminal.liminal_loss."""
    gen = torch.Generator().manual_seed(4)
    stack = _stack(SEEDS)
    base = {
        n: v.detach() + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        for n, v in stack.items()
    }
    x = torch.rand(3, 16, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
    batch = DistillBatch(
        x, stack_forward(base, x)[..., 10:], 10, stack_forward(base, x)[..., :10], 0.7, temperature
    )
    probes = _probes(gen)
    optimizer = torch.optim.SGD(list(stack.values()), lr=0.0)
    logits = stack_forward(stack, x).detach()
    result = stacked_step(stack, optimizer, batch, probes, heldout=False)
    for m in range(3):
        expected = liminal_loss(logits[m, :, :10], batch.base_logits[m], temperature=temperature)
        got = result.records["train_loss"][m] - result.records["distill_loss"][m]
        torch.testing.assert_close(got, 0.7 * expected)
        assert float(expected) > 1e-4


def test_remove_random_takes_off_as_much_as_remove_along_other_directions_per_model() -> None:
    gen = torch.Generator().manual_seed(5)
    stack = _stack(SEEDS)
    teachers = {n: v.detach() for n, v in _stack([10, 11, 12]).items()}
    probes = _probes(gen)
    x = torch.rand(3, 16, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
    batch = DistillBatch(x, stack_forward(teachers, x)[..., 10:], 10)
    removed = {}
    for name in ("remove", "remove_random"):
        params = {n: v.detach().clone().requires_grad_(True) for n, v in stack.items()}
        before = per_model(student_transforms(get_conditions([name])[0])[0], vectorize=False)
        views = [model_view(params, m) for m in range(3)]  # before the step
        seen = {
            n: torch.stack(
                [
                    loss_and_grad(v, logit_kl(10), x[m], batch.targets[m])[1][n]
                    for m, v in enumerate(views)
                ]
            )
            for n in params
        }
        optimizer = torch.optim.SGD(list(params.values()), lr=1.0)
        result = stacked_step(
            params,
            optimizer,
            batch,
            probes,
            before=before,
            before_state=before.init(params),
            heldout=False,
        )
        applied = {n: stack[n].detach() - params[n].detach() for n in params}
        removed[name] = {n: seen[n] - applied[n] for n in params}
        if name == "remove_random":  # one draw per model so far, each from its own key
            (state,) = result.before_state.values()
            assert state.count.tolist() == [1, 1, 1] and len(set(state.key.tolist())) == 3
    size = {k: sum(v[n].flatten(1).square().sum(1) for n in v).sqrt() for k, v in removed.items()}
    torch.testing.assert_close(size["remove_random"], size["remove"])
    assert float(size["remove"].min()) > 0
    flat = torch.cat([removed["remove_random"][n].flatten(1) for n in removed["remove_random"]], 1)
    cosines = (
        torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    )
    # each model draws its own direction (one shared direction would give |cos| = 1)
    assert float((cosines - torch.eye(3, dtype=cosines.dtype)).abs().max()) < 0.5


@pytest.mark.parametrize(("name", "moved"), [("remove", True), ("remove_support", False)])
def test_support_restricted_removal_leaves_the_class_rows_alone(name: str, moved: bool) -> None:
    """The distillation gradient is exactly zero on the 10 class rows of the output layer:
    the global removal writes -c g_t there (Adam then moves them), the support-restricted one
    writes nothing, so they never move; both leave g orthogonal to g_t."""
    (condition,) = get_conditions([name])
    gen = torch.Generator().manual_seed(1)
    stack = _stack(SEEDS)
    start = {n: v.detach().clone() for n, v in stack.items()}
    teachers = {n: v.detach() for n, v in _stack([10, 11, 12]).items()}
    optimizer = make_optimizer(condition, list(stack.values()), StudentSetup(lr=1e-2))
    before, _ = student_transforms(condition)
    before = per_model(before)
    state = before.init(stack)
    probes = _probes(gen)
    for _ in range(3):
        x = torch.rand(3, 16, SIZES[0], generator=gen, dtype=torch.float64) * 2 - 1
        targets = stack_forward(teachers, x)[..., 10:]
        result = stacked_step(
            stack, optimizer, DistillBatch(x, targets, 10), probes,
            before=before, before_state=state, heldout=False,
        )  # fmt: skip
        state = result.before_state
        assert float(result.records["applied_cosine"].abs().max()) < 1e-10
    end = {n: v.detach() for n, v in stack.items()}
    for p in ("4.weight", "4.bias"):
        if moved:
            assert float((end[p][:, :10] - start[p][:, :10]).abs().max()) > 1e-4
        else:
            assert torch.equal(end[p][:, :10], start[p][:, :10])
    assert float((end["0.weight"] - start["0.weight"]).abs().max()) > 1e-4  # it trains
