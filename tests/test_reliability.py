"""Bad inputs to the public API: each is a clear error, never a silently wrong number (issue 10).

One table of cases: the call, the error type, and phrases the message must
contain (the cause and the fix in gradlens's words). Below it, the cases where
the state after a refusal matters too (BatchNorm statistics, ``.grad``), and
the step that a mean-reduced loss takes (exactly a plain backward's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import alignment, per_example_dots, per_example_grads
from gradlens.errors import GradientMismatchError, NonFiniteGradientError, UnsupportedModelError
from gradlens.probes.vmap import loss_and_grad
from gradlens.records.recorder import Recorder, Variable
from gradlens.training import Objective, probed_step


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def batch(n: int = 6, labels: int | None = None) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(
        0, 3, (n if labels is None else labels,)
    )


def objective(
    n: int = 6, labels: int | None = None, loss_fn: Callable[..., Tensor] = F.cross_entropy
) -> Objective:
    x, y = batch(n, labels)
    return Objective(loss_fn, x, (y,))


def step(model: nn.Module | None = None, **changes: object) -> object:
    """probed_step on an MLP with an SGD optimizer over it; ``changes`` replace its arguments."""
    model = model or mlp()
    args: dict[str, object] = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "train": objective(),
        "trait": objective(8),
    }
    args.update(changes)
    return probed_step(**args)  # type: ignore[arg-type]


class TwoHeads(nn.Module):
    """A model whose second head never reaches the output."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.linear(x), 0.5, training=True)


class InPlace(nn.Module):
    """Writes each example's values into a buffer shared by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("scratch", torch.zeros(1, 3))

    def forward(self, x: Tensor) -> Tensor:
        out = self.scratch.clone()
        out.add_(self.linear(x))
        return out


class Centred(nn.Module):
    """Subtracts the batch mean: one example's output depends on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        return h - h.mean(dim=0, keepdim=True)


def no_reduction(outputs: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(outputs, labels, reduction="none")


def summed(outputs: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(outputs, labels, reduction="sum")


def log_into(dtype: str, value: object) -> None:
    Recorder(None, {"v": Variable(("step",), "a value", dtype=dtype)}).log(0, v=value)  # type: ignore[arg-type]


NAN = {"0.weight": torch.tensor([1.0, float("nan")]), "1.weight": torch.ones(2)}
INF = {"0.weight": torch.ones(2), "1.weight": torch.tensor([float("inf"), 1.0])}
ONES = {"0.weight": torch.ones(2), "1.weight": torch.ones(2)}


@dataclass(frozen=True)
class Case:
    call: Callable[[], object]
    error: type[BaseException]
    phrases: tuple[str, ...]


CASES: dict[str, Case] = {
    # alignment: docs/concepts.md promises NonFiniteGradientError, not a NaN cosine
    "alignment of a NaN gradient": Case(
        lambda: alignment(NAN, reference=ONES),
        NonFiniteGradientError,
        ("gradient", "NaN or infinite values in ['0.weight']"),
    ),
    "alignment with an infinite reference": Case(
        lambda: alignment(ONES, reference=INF),
        NonFiniteGradientError,
        ("reference gradient", "['1.weight']"),
    ),
    "alignment of other keys": Case(
        lambda: alignment({"a": torch.ones(2)}, reference=ONES),
        GradientMismatchError,
        ("different keys", "only in the first ['a']", "`params`"),
    ),
    # per-example gradients
    "chunk_size=-1": Case(
        lambda: per_example_grads(mlp(), F.cross_entropy, *batch(), chunk_size=-1),
        ValueError,
        ("chunk_size must be a positive number of examples, or None", "got -1"),
    ),
    "chunk_size=0 for dots": Case(
        lambda: per_example_dots(
            mlp(), F.cross_entropy, *batch(), reference=dict(mlp().named_parameters()), chunk_size=0
        ),
        ValueError,
        ("chunk_size must be a positive number",),
    ),
    "more targets than inputs": Case(
        lambda: per_example_grads(mlp(), F.cross_entropy, *batch(6, labels=7)),
        ValueError,
        ("inputs has 6 examples", "targets[0] has shape (7,)", "one row per example"),
    ),
    "fewer targets than inputs, chunked": Case(
        lambda: per_example_grads(mlp(), F.cross_entropy, *batch(6, labels=4), chunk_size=2),
        ValueError,
        ("inputs has 6 examples", "targets[0] has shape (4,)"),
    ),
    "a target that is not a tensor": Case(
        lambda: per_example_grads(mlp(), F.cross_entropy, batch()[0], [0, 1, 2, 0, 1, 2]),  # type: ignore[arg-type]
        TypeError,
        ("targets[0] is a list", "torch.as_tensor"),
    ),
    "a non-scalar loss": Case(
        lambda: per_example_grads(mlp(), no_reduction, *batch()),
        ValueError,
        ("loss_fn returned a tensor of shape (1,) for one example", "reduction='mean'"),
    ),
    "a non-scalar loss, plain gradient": Case(
        lambda: loss_and_grad(mlp(), no_reduction, *batch()),
        ValueError,
        ("loss_fn returned (6,) for a batch", "scalar", "reduction='mean'"),
    ),
    "a functional dropout": Case(
        lambda: per_example_grads(FunctionalDropout().double(), F.cross_entropy, *batch()),
        UnsupportedModelError,
        ("draws random numbers", "F.dropout", "randomness='different'"),
    ),
    "an unused parameter": Case(
        lambda: loss_and_grad(TwoHeads().double(), F.cross_entropy, *batch()),
        UnsupportedModelError,
        (
            "['unused.weight', 'unused.bias'] do not affect the loss",
            "requires_grad_(False)",
            "`params`",
        ),
    ),
    "an unknown parameter name": Case(
        lambda: per_example_grads(mlp(), F.cross_entropy, *batch(), params=["0.wieght"]),
        UnsupportedModelError,
        ("['0.wieght'] are not parameters of Sequential", "choose among"),
    ),
    "train-mode BatchNorm": Case(
        lambda: per_example_grads(
            nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double(), F.cross_entropy, *batch()
        ),
        UnsupportedModelError,
        ("BatchNorm1d", "training mode", "model.eval()"),
    ),
    "a dropout module": Case(
        lambda: per_example_grads(
            nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).double(), F.cross_entropy, *batch()
        ),
        UnsupportedModelError,
        ("(Dropout) draws random masks in training mode", "randomness='different'"),
    ),
    "an in-place write into a shared tensor": Case(
        lambda: per_example_grads(InPlace().double(), F.cross_entropy, *batch()),
        UnsupportedModelError,
        ("fails under vmap although one example runs without it", "out-of-place"),
    ),
    "a forward that mixes examples": Case(
        lambda: per_example_dots(
            Centred().double(),
            F.cross_entropy,
            *batch(),
            reference=dict(Centred().double().named_parameters()),
        ),
        UnsupportedModelError,
        ("mixes examples", "model.eval()"),
    ),
    # probed_step
    "a NaN input": Case(
        lambda: step(
            trait=Objective(
                F.cross_entropy,
                torch.full((4, 4), float("nan"), dtype=torch.float64),
                (torch.zeros(4, dtype=torch.long),),
            ),
            step=3,
        ),
        NonFiniteGradientError,
        ("the trait gradient at step 3 has NaN or infinite values",),
    ),
    "an empty training batch": Case(
        lambda: step(train=objective(0)),
        ValueError,
        ("train.inputs has no examples", "Skip empty batches", "drop_last=True"),
    ),
    "an empty trait batch": Case(
        lambda: step(trait=objective(0)),
        ValueError,
        ("trait.inputs has no examples",),
    ),
    "training targets of other examples": Case(
        lambda: step(train=objective(8, labels=7)),
        ValueError,
        ("train.inputs has 8 examples", "train.targets[0] has shape (7,)"),
    ),
    "a sum-reduced training loss": Case(
        lambda: step(train=objective(loss_fn=summed)),
        ValueError,
        (
            "It is their sum (reduction='sum')",
            "mean of the per-example gradients",
            "reduction='mean'",
        ),
    ),
    "an unreduced training loss": Case(
        lambda: step(train=objective(loss_fn=no_reduction)),
        ValueError,
        ("loss_fn returned a tensor of shape", "must return a scalar", "reduction='mean'"),
    ),
    "an optimizer of another model": Case(
        lambda: step(optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1)),
        ValueError,
        ("optimizer does not hold the model's parameters ['0.weight'", "model.parameters()"),
    ),
    "an unused parameter in a step": Case(
        lambda: step(TwoHeads().double()),
        UnsupportedModelError,
        ("['unused.weight', 'unused.bias'] do not affect the loss", "requires_grad_(False)"),
    ),
    # Recorder: a value the declared dtype would store as another number
    "2**40 into int32": Case(
        lambda: log_into("int32", 2**40),
        ValueError,
        (
            "declared int32, which holds -2147483648..2147483647",
            "got 1099511627776",
            "dtype='int64'",
        ),
    ),
    "a negative int64 into int32": Case(
        lambda: log_into("int32", np.array([1, -(2**40)], dtype=np.int64)),
        ValueError,
        ("got -1099511627776",),
    ),
    "2**70 into int64": Case(
        lambda: log_into("int64", 2**70),
        ValueError,
        ("declared int64", "got 1180591620717411303424", "declare it as a float"),
    ),
    "a uint64 beyond int64": Case(
        lambda: log_into("int64", np.uint64(2**63 + 5)),
        ValueError,
        ("got 9223372036854775813",),
    ),
    "2**24 + 1 into float32": Case(
        lambda: log_into("float32", 2**24 + 1),
        ValueError,
        ("cannot hold the integer 16777217 exactly (it would store 16777216)", "dtype='float64'"),
    ),
    "a step beyond int64": Case(
        lambda: Recorder(None, {"v": Variable(("step",), "v")}).log(2**70, v=1.0),
        ValueError,
        ("step 1180591620717411303424 does not fit the int64 step coordinate",),
    ),
    "a float into int64": Case(
        lambda: log_into("int64", torch.tensor(2.5)),
        ValueError,
        ("declared int64 but got values of float32", "log integers"),
    ),
    "1e300 into float32": Case(
        lambda: log_into("float32", 1e300),
        ValueError,
        (
            "declared float32, whose largest value is 3.4e+38",
            "got 1e+300",
            "stored as infinity",
            "dtype='float64'",
        ),
    ),
    "a complex number into float32": Case(
        lambda: log_into("float32", 1 + 2j),
        ValueError,
        ("got values of complex128", "log real numbers"),
    ),
    "None into float32": Case(
        lambda: log_into("float32", None),
        ValueError,
        ("got values of object (None)",),
    ),
    "a string into float64": Case(
        lambda: log_into("float64", "0.5"),
        ValueError,
        ("got values of <U3 ('0.5')",),
    ),
    "an unknown variable": Case(
        lambda: Recorder(None, {"loss": Variable(("step",), "loss")}).log(0, los=1.0),
        ValueError,
        ("unknown variables ['los']; declared: ['loss']",),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_a_clear_error(name: str) -> None:
    case = CASES[name]
    with pytest.raises(case.error) as caught:
        case.call()
    message = str(caught.value)
    missing = [phrase for phrase in case.phrases if phrase not in message]
    assert not missing, f"{missing} not in: {message}"


def test_values_that_fit_are_stored_exactly() -> None:
    """The checks refuse only what would change: the limits themselves pass unchanged."""
    rec = Recorder(
        None,
        {
            "i32": Variable(("step",), "int32", dtype="int32"),
            "i64": Variable(("step",), "int64", dtype="int64"),
            "f32": Variable(("step",), "float32"),
        },
    )
    rec.log(0, i32=2**31 - 1, i64=np.uint64(2**63 - 1), f32=float("inf"))
    rec.log(1, i32=-(2**31), i64=True, f32=float("nan"))
    rec.log(2, i32=np.int64(7), i64=-(2**63), f32=3.0e38)
    rec.log(3, i32=0, i64=0, f32=2**24)
    ds = rec.dataset()
    assert ds["i32"].values.tolist() == [2**31 - 1, -(2**31), 7, 0]
    assert ds["i64"].values.tolist() == [2**63 - 1, 1, -(2**63), 0]
    f32 = ds["f32"].values
    assert np.isposinf(f32[0]) and np.isnan(f32[1]) and f32[2] == np.float32(3.0e38)
    assert f32[3] == 2**24


def test_a_refused_batchnorm_step_leaves_the_running_statistics_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    buffers = copy.deepcopy(dict(model.named_buffers()))
    params = copy.deepcopy(dict(model.named_parameters()))
    with pytest.raises(UnsupportedModelError, match="BatchNorm1d"):
        step(model)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name  # num_batches_tracked included
    for name, value in model.named_parameters():
        assert torch.equal(value, params[name]) and value.grad is None, name


def test_a_foreign_optimizer_is_refused_before_any_change() -> None:
    model = mlp()
    params = copy.deepcopy(dict(model.named_parameters()))
    with pytest.raises(ValueError, match="does not hold the model's parameters"):
        step(model, optimizer=torch.optim.SGD(mlp().parameters(), lr=0.1))
    for name, value in model.named_parameters():
        assert torch.equal(value, params[name]) and value.grad is None, name


def test_an_optimizer_missing_some_parameters_is_refused() -> None:
    model = mlp()
    opt = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"parameters \['2.weight', '2.bias'\]"):
        step(model, optimizer=opt)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, lambda o, y: F.cross_entropy(o, y) / 1.0])
def test_a_mean_reduced_step_is_the_plain_backward_step(loss_fn: Callable[..., Tensor]) -> None:
    """What the reduction check lets through takes exactly the plain SGD step (float64)."""
    probed, plain = mlp(), mlp()
    plain.load_state_dict(probed.state_dict())
    train, trait = objective(7, loss_fn=loss_fn), objective(5)
    step(probed, train=train, trait=trait, optimizer=torch.optim.SGD(probed.parameters(), lr=0.5))
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    loss_fn(plain(train.inputs), *train.targets).backward()
    opt.step()
    for (name, a), b in zip(probed.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_a_single_example_batch_needs_no_reduction_check() -> None:
    """With one example, sum and mean are the same loss: the step goes ahead."""
    result = step(train=objective(1, loss_fn=summed))
    assert np.isfinite(float(result.records["cosine"]))  # type: ignore[attr-defined]


def test_a_reference_in_another_dtype_is_taken_in_the_parameters_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    want, _ = per_example_dots(model, F.cross_entropy, x, y, reference=ref)
    got, _ = per_example_dots(
        model, F.cross_entropy, x, y, reference={n: r.double() for n, r in ref.items()}
    )
    for name in ref:
        torch.testing.assert_close(got[name], want[name])


def test_a_model_on_the_meta_device_is_named() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(UnsupportedModelError, match="meta device"):
        per_example_grads(model, F.cross_entropy, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedModelError, match="to_empty"):
        probed_step(
            model, opt, Objective(F.cross_entropy, x, (y,)), Objective(F.cross_entropy, x, (y,))
        )
