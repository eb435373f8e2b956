"""Host reads of tensor values during a probed step in steady state (issue 21).

A read of a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``.tolist()``, ``.cpu()``, an output whose shape depends on the data) waits for
the device: on a GPU each one stalls the queue of kernels. The counter below
records every such call made while a step runs, with the innermost gradlens
frame that made it. The step is taken after warm-up steps, so one-off work
(planning, first checks) is out of the count.

Today's reads (see :data:`KNOWN`) are each a check that must not be lost; the
strict xfail names them and fails once they are gone, so this file is updated.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import gradlens
from gradlens import Objective, probed_step, stack_modules, stacked_probed_step
from gradlens.errors import NonFiniteGradientError
from gradlens.probes.checks import DeferredCheck, settle
from gradlens.probes.deferred import deferred_checks
from gradlens.transforms import remove_aligned

_READS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "__array__",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "is_nonzero",
    "equal",
    "allclose",
}
"""Functions whose result needs the tensor's values on the host (or a data-dependent shape)."""

_PACKAGE = Path(gradlens.__file__).resolve().parent
_OPTIM = Path(torch.optim.__file__).resolve().parent
OPTIMIZER = "the user's torch.optim optimizer"
"""Reads inside the optimizer's step (Adam without ``capturable=True`` reads its step
count, once per parameter): an unprobed step makes them too, so they are not the probe's."""


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values, by ``(name, gradlens file:line, function)``."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and any(
            isinstance(a, Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],))
        )
        if name in _READS or boolean_index:
            self.sites[(name if not boolean_index else "bool index", *self._where())] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _where() -> tuple[str, str]:
        """The innermost gradlens frame, or the optimizer's, or neither."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = Path(frame.filename).resolve()
            if path.is_relative_to(_OPTIM):
                return OPTIMIZER, frame.name
            if path.is_relative_to(_PACKAGE):
                return f"{path.relative_to(_PACKAGE)}:{frame.lineno}", frame.name
        return "outside gradlens", ""

    def functions(self) -> set[tuple[str, str]]:
        """The reading ``(file, function)`` pairs of gradlens, without line numbers."""
        return {(where.split(":")[0], fn) for _, where, fn in self.sites if where != OPTIMIZER}

    def describe(self) -> str:
        return "; ".join(
            f"{n}x {name} at {where} ({fn})" for (name, where, fn), n in self.sites.items()
        )


KNOWN = {
    ("training/checks.py", "check_all_finite"): "finiteness of every gradient, before the step",
    ("probes/checks.py", "settle"): "the batch loss is the examples' mean (each model's, in a "
    "stack); the first and last example alone give their batch outputs (one read for all)",
}
"""The host reads of a steady-state probed step today, each a check (see the report in
docs/benchmarks.md, "Host reads of a probed step")."""


def _case(kind: str) -> Callable[[], object]:
    """A step function of ``kind``: each call takes one step on the same batches."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 8), torch.randint(0, 4, (12,))
    tx, ty = torch.randn(6, 8), torch.randint(0, 4, (6,))

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    if kind == "stacked":
        stack = stack_modules([net() for _ in range(3)])
        opt = torch.optim.Adam(stack.params.values(), lr=1e-3)
        train = Objective(F.cross_entropy, x.expand(3, *x.shape), (y.expand(3, *y.shape),))
        trait = Objective(F.cross_entropy, tx.expand(3, *tx.shape), (ty.expand(3, *ty.shape),))
        return lambda: stacked_probed_step(stack, opt, train, trait)
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train, trait = Objective(F.cross_entropy, x, (y,)), Objective(F.cross_entropy, tx, (ty,))
    if kind == "remove_aligned":
        tx_ = remove_aligned()
        state = [tx_.init(dict(model.named_parameters()))]

        def step() -> object:
            out = probed_step(model, opt, train, trait, before=tx_, before_state=state[0])
            state[0] = out.before_state
            return out

        return step
    return lambda: probed_step(model, opt, train, trait, measure_change=kind != "no_change")


def _steady_reads(kind: str) -> HostReads:
    step = _case(kind)
    for _ in range(2):
        step()
    reads = HostReads()
    with reads:
        step()
    return reads


def test_the_counter_sees_every_kind_of_host_read() -> None:
    t = torch.tensor([1.0, 0.0, 2.0])
    reads = HostReads()
    with reads:
        t.sum().item()
        bool(t.all())
        float(t[0])
        int(t[2])
        t.tolist()
        t.nonzero()
        t[t > 0]
        t.cpu()
        t.numpy()
        if t.any():
            pass
    names = collections.Counter(name for name, _, _ in reads.sites.elements())
    assert names == {
        "item": 1,
        "__bool__": 2,
        "__float__": 1,
        "__int__": 1,
        "tolist": 1,
        "nonzero": 1,
        "bool index": 1,
        "cpu": 1,
        "numpy": 1,
    }
    assert {where for _, where, _ in reads.sites} == {"outside gradlens"}


@pytest.mark.parametrize("kind", ["plain", "no_change", "remove_aligned", "stacked"])
def test_a_steady_state_step_reads_only_known_checks(kind: str) -> None:
    reads = _steady_reads(kind)
    assert reads.functions(), "a step without reads: update KNOWN and remove the xfail below"
    unknown = reads.functions() - set(KNOWN)
    assert not unknown, f"new host reads in a probed step: {reads.describe()}"


@pytest.mark.parametrize("kind", ["plain", "remove_aligned", "stacked"])
def test_every_finiteness_check_of_a_step_shares_one_read(kind: str) -> None:
    reads = _steady_reads(kind)
    finite = [n for (_, where, fn), n in reads.sites.items() if fn == "check_all_finite"]
    assert finite == [1], reads.describe()


@pytest.mark.parametrize("kind", ["plain", "no_change", "remove_aligned"])
def test_the_probes_checks_of_the_batch_share_one_read(kind: str) -> None:
    reads = _steady_reads(kind)
    settled = [n for (_, where, fn), n in reads.sites.items() if fn == "settle"]
    assert settled == [1], reads.describe()
    # 5 reads before (check_mean_loss 1, check_rows_alone 3, check_all_finite 1); 2 now
    total = sum(n for (_, where, _), n in reads.sites.items() if where != OPTIMIZER)
    assert total == 2, reads.describe()


def test_the_stacked_mean_loss_check_reads_once_per_step() -> None:
    reads = _steady_reads("stacked")
    means = [n for (_, _, fn), n in reads.sites.items() if fn == "settle"]
    assert means == [1], reads.describe()


@pytest.mark.parametrize("kind", ["plain", "no_change", "remove_aligned", "stacked"])
def test_inside_deferred_checks_a_steady_state_step_reads_nothing(kind: str) -> None:
    step = _case(kind)
    with deferred_checks(every=10) as ledger:
        for _ in range(2):
            step()
        reads = HostReads()
        with reads:
            step()
        assert len(ledger) > 0  # the checks were made, and are held
    assert not reads.functions(), reads.describe()


def test_deferred_checks_read_every_n_steps_and_at_the_end() -> None:
    step = _case("plain")
    step()  # planning
    with deferred_checks(every=3) as ledger:
        counts = []
        for _ in range(7):
            reads = HostReads()
            with reads:
                step()
            counts.append(sum(n for (_, where, _), n in reads.sites.items() if where != OPTIMIZER))
            if counts[-1]:
                assert len(ledger) == 0
        held = len(ledger)
    assert counts == [0, 0, 1, 0, 0, 1, 0]  # the 3rd and 6th steps read; the 7th waits
    assert held > 0 and len(ledger) == 0  # read when the block ended


@pytest.mark.xfail(
    strict=True,
    reason="today a steady-state step reads the host in: "
    + "; ".join(f"{f} {fn} ({why})" for (f, fn), why in KNOWN.items()),
)
@pytest.mark.parametrize("kind", ["plain", "stacked"])
def test_a_steady_state_step_reads_nothing(kind: str) -> None:
    reads = _steady_reads(kind)
    assert not reads.functions(), reads.describe()


def _nan(objective: Objective) -> Objective:
    inputs = objective.inputs.clone()
    inputs[1, 0] = float("nan")
    return Objective(objective.loss_fn, inputs, objective.targets)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"trait"}, "trait gradient"),
        ({"reference"}, "transforms' reference gradient"),
        ({"heldout"}, "held-out trait gradient"),
        ({"train"}, "training gradient"),
        ({"train", "trait"}, "trait gradient"),  # the first in the step's order
        ({"train", "heldout"}, "held-out trait gradient"),
    ],
)
def test_the_one_read_loses_no_finiteness_check(bad: set[str], named: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def objective(n: int) -> Objective:
        x = torch.randn(n, 8, dtype=torch.float64)
        return Objective(F.cross_entropy, x, (torch.randint(0, 4, (n,)),))

    given = {k: objective(n) for k, n in (("train", 6), ("trait", 5), ("reference", 4))}
    given["heldout"] = objective(3)
    given = {k: _nan(o) if k in bad else o for k, o in given.items()}
    with pytest.raises(NonFiniteGradientError, match=f"the {named} at step 11 has NaN") as info:
        probed_step(
            model,
            opt,
            given["train"],
            given["trait"],
            reference=given["reference"],
            heldout=given["heldout"],
            before=remove_aligned(),
            before_state=remove_aligned().init(before),
            step=11,
        )
    assert info.value.step == 11 and "0.weight" in info.value.names
    for n, p in model.named_parameters():  # refused before the optimizer stepped
        assert torch.equal(p.detach(), before[n]), n


def test_a_deferred_non_finite_gradient_is_raised_at_the_read_naming_its_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    good = Objective(F.cross_entropy, x, (y,))
    probed_step(model, opt, good, good, step=0)  # planning
    after_2 = []
    with (
        pytest.raises(NonFiniteGradientError, match="the trait gradient at step 2 has NaN") as info,
        deferred_checks(every=4),
    ):
        for step in range(1, 5):
            trait = _nan(good) if step == 2 else good
            result = probed_step(model, opt, good, trait, step=step)
            if step == 2:
                assert result.records["cosine"].isnan()  # no error yet: a NaN record
                after_2.append(model[0].weight.detach().clone())
    assert info.value.step == 2 and "0.weight" in info.value.names
    note = " ".join(getattr(info.value, "__notes__", [])) or str(info.value)
    assert "failed at step 2 and was read at step 4" in note
    assert not torch.equal(model[0].weight, after_2[0])  # steps 3 and 4 were applied


def test_a_deferred_mean_loss_failure_keeps_its_own_error() -> None:
    """A stacked step whose second model's loss is not a mean, found at the read."""
    torch.manual_seed(0)
    stack = stack_modules([nn.Linear(4, 3) for _ in range(3)])
    opt = torch.optim.SGD(stack.params.values(), lr=0.1)
    x, y = torch.randn(3, 5, 4), torch.randint(0, 3, (3, 5))
    trait = Objective(F.cross_entropy, x, (y,))

    def summed(out: Tensor, target: Tensor) -> Tensor:  # a sum, not a mean, over examples
        return F.cross_entropy(out, target, reduction="sum")

    stacked_probed_step(stack, opt, trait, trait)  # planning
    with pytest.raises(ValueError, match="mean") as info, deferred_checks(every=5):
        stacked_probed_step(stack, opt, Objective(summed, x, (y,)), trait, step=1)
    note = " ".join(getattr(info.value, "__notes__", [])) or str(info.value)
    assert "failed at step 1" in note


def test_deferred_checks_refuse_a_bad_every_and_read_nothing_when_the_block_raises() -> None:
    with pytest.raises(ValueError, match="every"), deferred_checks(every=0):
        pass
    with pytest.raises(KeyError), deferred_checks(every=10):  # the block's error, not the check's
        settle([DeferredCheck(torch.tensor(True), lambda: 1 / 0)])
        raise KeyError("the block's")
