"""distributed_probed_step on 2 CPU processes (gloo) against probed_step on the whole batch.

Two processes are spawned once per test session; each runs every scenario on
its shard of the batch and saves what it saw, and the tests compare that with
one process that sees the concatenated batch (float64, so the tolerance is
rounding only) and the two ranks with each other (bit for bit).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gradlens import GradlensError, Objective, open_run, probed_step
from gradlens.training import reuse_trait
from gradlens.training.distributed import (
    ReplicaDivergenceError,
    distributed_probed_step,
    gather_examples,
)
from gradlens.transforms import GradientTransform, remove_aligned, remove_aligned_per_example

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
TRAIT = 10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(step: int, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole training and trait batches of a step, the same in every process."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(size, 3, generator=gen, dtype=torch.float64)
    x_t = torch.randn(TRAIT, 5, generator=gen, dtype=torch.float64)
    y_t = torch.randint(0, 3, (TRAIT,), generator=gen)
    return x, y, x_t, y_t


# name -> (training shard sizes by rank, trait shard sizes or None if replicated,
#          before transform factory, after transform factory)
Scenario = tuple[list[int], list[int] | None, Callable[[], Any], Callable[[], Any]]
SCENARIOS: dict[str, Scenario] = {
    "remove_aligned": ([4, 4], None, remove_aligned, lambda: None),
    "per_example": (
        [5, 3],
        [6, 4],
        lambda: remove_aligned_per_example(only_positive=True),
        lambda: remove_aligned(scope="layer"),
    ),
    "reused_trait": ([4, 4], None, remove_aligned, lambda: None),
}
EVERY = {"reused_trait": 2}
"""Scenarios that take the trait gradient every few steps (``trait_cache``)."""


def init(tx: GradientTransform | None, model: nn.Module) -> Any:
    return None if tx is None else tx.init(dict(model.named_parameters()))


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_scenario(name: str, rank: int | None) -> list[dict[str, Any]]:
    """Run a scenario on rank ``rank``'s shard, or on the whole batch with ``rank=None``."""
    sizes, trait_sizes, make_before, make_after = SCENARIOS[name]
    model = make_model()
    wrapped = model if rank is None else DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    before, after = make_before(), make_after()
    before_state, after_state = init(before, model), init(after, model)
    cache = reuse_trait(EVERY[name]) if name in EVERY else None
    steps = []
    for step in range(STEPS):
        x, y, x_t, y_t = batch(step, sum(sizes))
        if rank is not None:
            start = sum(sizes[:rank])
            x, y = x[start : start + sizes[rank]], y[start : start + sizes[rank]]
            if trait_sizes is not None:
                start = sum(trait_sizes[:rank])
                x_t, y_t = (
                    x_t[start : start + trait_sizes[rank]],
                    y_t[start : start + trait_sizes[rank]],
                )
        train, trait = Objective(F.mse_loss, x, (y,)), Objective(F.cross_entropy, x_t, (y_t,))
        common = dict(
            before=before,
            before_state=before_state,
            after=after,
            after_state=after_state,
            trait_cache=cache,
        )
        if rank is None:
            out = probed_step(model, opt, train, trait, step=step, **common)
            index = torch.arange(sum(sizes))
        else:
            layout = "replicated" if trait_sizes is None else "sharded"
            out = distributed_probed_step(
                wrapped, opt, train, trait, trait_batch=layout, step=step, **common
            )
            start = sum(sizes[:rank])
            index = gather_examples(torch.arange(start, start + sizes[rank]))
        before_state, after_state, cache = out.before_state, out.after_state, out.trait_cache
        steps.append(
            {
                "records": {k: v.detach().clone() for k, v in out.records.items()},
                "example_cosine": out.example_cosine.clone(),
                "states": (before_state, after_state),
                "params": params_of(model),
                "index": index,
            }
        )
    return steps


def diverge(rank: int) -> str:
    """Nudge rank 1's replica, take a step, and report what each rank raised."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if rank == 1:
        with torch.no_grad():
            model[0].bias[0] += 1e-3
    x, y, x_t, y_t = batch(0, 8)
    shard = slice(4 * rank, 4 * rank + 4)
    train = Objective(F.mse_loss, x[shard], (y[shard],))
    try:
        distributed_probed_step(model, opt, train, Objective(F.cross_entropy, x_t, (y_t,)))
    except ReplicaDivergenceError as exc:
        return str(exc)
    return "no error"


def weighted(out: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """A weighted mean: the mean of the examples' losses only where the weights are equal."""
    each = (out - y).square().mean(1)
    return (w * each).sum() / w.sum()


def refuse_on_one_rank(rank: int) -> str:
    """Rank 1's shard weighs its examples unequally (past the first two); rank 0's does not."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, x_t, y_t = batch(0, 8)
    shard = slice(4 * rank, 4 * rank + 4)
    w = torch.tensor([1.0, 1.0, 3.0, 1.0] if rank == 1 else [1.0] * 4, dtype=x.dtype)
    train = Objective(weighted, x[shard], (y[shard], w))
    try:
        distributed_probed_step(model, opt, train, Objective(F.cross_entropy, x_t, (y_t,)))
    except (ValueError, GradlensError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def diverge_buffer(rank: int) -> str:
    """Rank 1's BatchNorm running mean differs; the parameters do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double().eval()
    if rank == 1:
        with torch.no_grad():
            model[1].running_mean[0] += 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, x_t, y_t = batch(0, 8)
    shard = slice(4 * rank, 4 * rank + 4)
    train = Objective(F.mse_loss, x[shard], (y[shard],))
    try:
        distributed_probed_step(model, opt, train, Objective(F.cross_entropy, x_t, (y_t,)))
    except ReplicaDivergenceError as exc:
        return str(exc)
    return "no error"


def micro_vs_whole(rank: int) -> list[dict[str, Tensor]]:
    """One step on this rank's shard of 4, whole and as micro-batches of 1 and 3."""
    found = []
    x, y, x_t, y_t = batch(0, 8)
    for micro in (False, True):
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        shard = x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]
        if micro:
            train = [
                Objective(F.mse_loss, shard[0][a:b], (shard[1][a:b],)) for a, b in ((0, 1), (1, 4))
            ]
        else:
            train = Objective(F.mse_loss, shard[0], (shard[1],))
        out = distributed_probed_step(model, opt, train, Objective(F.cross_entropy, x_t, (y_t,)))
        found.append(out.records | {"params": torch.cat([p.flatten() for p in model.parameters()])})
    return found


def refusals(rank: int) -> dict[str, str]:
    """What every rank raises for an optimizer of another model and for a summed loss."""
    x, y, x_t, y_t = batch(0, 8)
    shard = slice(4 * rank, 4 * rank + 4)
    trait = Objective(F.cross_entropy, x_t, (y_t,))
    found = {}
    cases = {
        "foreign_optimizer": (torch.optim.SGD(make_model().parameters(), lr=0.1), F.mse_loss),
        "summed": (None, lambda out, t: F.mse_loss(out, t, reduction="sum")),
    }
    for name, (opt, loss) in cases.items():
        model = make_model()
        opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            distributed_probed_step(model, opt, Objective(loss, x[shard], (y[shard],)), trait)
            found[name] = "no error"
        except (ValueError, GradlensError) as exc:
            found[name] = f"{type(exc).__name__}: {exc}"
    return found


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        found = {name: run_scenario(name, rank) for name in SCENARIOS}
        found["diverge"] = diverge(rank)
        found["refuse"] = refuse_on_one_rank(rank)
        found["diverge_buffer"] = diverge_buffer(rank)
        found["micro"] = micro_vs_whole(rank)
        found["refusals"] = refusals(rank)
        torch.save(found, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def close(a: Tensor, b: Tensor, what: str, *, nan: bool = False) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=nan, msg=what)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process_on_the_concatenated_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    single = run_scenario(name, None)
    for step, want in enumerate(single):
        for rank, found in enumerate(ranks):
            got = found[name][step]
            where = f"{name}, step {step}, rank {rank}"
            for key, value in want["records"].items():
                # measured_change is NaN where g_t is reused (both sides)
                nan = key == "measured_change" and name in EVERY
                value = value.to(got["records"][key].dtype)
                close(got["records"][key], value, f"{key} ({where})", nan=nan)
            close(got["example_cosine"], want["example_cosine"], f"example_cosine ({where})")
            for param, value in want["params"].items():
                close(got["params"][param], value, f"{param} ({where})")
            for field, a, b in zip(["before", "after"], got["states"], want["states"], strict=True):
                if b is not None:
                    for x, y in zip(a, b, strict=True):
                        close(x, y, f"{field} state ({where})")
            assert torch.equal(got["index"], want["index"]), where


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_takes_the_identical_step(ranks: list[dict[str, Any]], name: str) -> None:
    for step in range(STEPS):
        a, b = ranks[0][name][step], ranks[1][name][step]
        for param in a["params"]:
            assert torch.equal(a["params"][param], b["params"][param]), (name, step, param)
        for key in a["records"]:
            # bit for bit: the same bits on every rank (NaN where g_t is reused)
            torch.testing.assert_close(
                a["records"][key], b["records"][key], rtol=0, atol=0, equal_nan=True
            )
        assert torch.equal(a["example_cosine"], b["example_cosine"]), (name, step)


def test_a_transform_acted_so_the_comparison_is_not_vacuous(ranks: list[dict[str, Any]]) -> None:
    # remove_aligned made the gradient orthogonal to g_t, which it was not before.
    for step in ranks[0]["remove_aligned"]:
        state = step["states"][0]
        assert abs(float(state.cosine_before)) > 1e-3 and abs(float(state.cosine_after)) < 1e-9
    # The per-example transform (only_positive) acted on some but not all examples.
    acted = [float(s["states"][0].acted) for s in ranks[0]["per_example"]]
    assert any(0 < a < 1 for a in acted), acted


def test_a_diverged_replica_is_reported_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for found in ranks:
        assert "rank 1: ['0.bias']" in found["diverge"], found["diverge"]


def test_a_refusal_on_one_rank_is_raised_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert ranks[1]["refuse"].startswith("ValueError: the batch loss"), ranks[1]["refuse"]
    assert "weighs the examples unequally" in ranks[1]["refuse"]
    assert ranks[0]["refuse"].startswith("GradlensError: ranks [1] refused"), ranks[0]["refuse"]


def test_a_foreign_optimizer_and_a_summed_loss_are_refused_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for found in ranks:
        assert "does not hold the model's parameters" in found["refusals"]["foreign_optimizer"]
        assert "reduction='sum'" in found["refusals"]["summed"], found["refusals"]["summed"]


def test_a_diverged_buffer_is_reported_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for found in ranks:
        assert "rank 1: ['1.running_mean']" in found["diverge_buffer"], found["diverge_buffer"]


def test_micro_batches_on_every_rank_equal_the_whole_shards(ranks: list[dict[str, Any]]) -> None:
    for found in ranks:
        whole, micro = found["micro"]
        for key, value in whole.items():
            torch.testing.assert_close(micro[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_without_a_process_group_the_error_names_the_remedy() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, x_t, y_t = batch(0, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed_probed_step(
            model,
            opt,
            Objective(F.mse_loss, x, (y,)),
            Objective(F.cross_entropy, x_t, (y_t,)),
        )


def test_the_ddp_example_writes_a_run_in_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location(
        "ddp_distill", ROOT / "experiments" / "ddp_distill.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ddp_distill", example)  # its dataclass looks itself up
    spec.loader.exec_module(example)
    config = example.Config(steps=3, teacher_steps=2, example_every=2, out=str(tmp_path / "r.nc"))
    run = open_run(example.main(config))
    assert run.attrs["world_size"] == 1
    assert run["trait_loss"].sizes == {"step": 3}
    assert run["example_id"].values.tolist() == [list(range(16)), list(range(32, 48))]
    # remove_aligned (the default) left the gradient orthogonal to g_t.
    after = run["transform_cosine"].sel(placement="before", stage="after", group="all")
    assert float(abs(after).max()) < 1e-5
