"""The DDP entry's methods: an ordinary ``DistributedDataParallel`` step and probed ones.

Each method wraps the workload's student in ``DistributedDataParallel`` over
the current process group (:func:`process_group`: a group of this one process
where none is initialised, so that the agreement check and
``profile_case`` run a DDP method in one process) and yields one step:

- ``plain``: forward, ``backward`` (DDP's bucketed all-reduce, overlapped with
  the backward) and an SGD step;
- ``probed``: :func:`~gradlens.training.distributed.distributed_probed_step`
  with its defaults (trait gradient, per-example probe, trait loss after the
  step, replica check), no transform;
- ``lean``: the same without the trait loss after the step and the replica
  check, and with the trait batch sharded over the ranks;
- ``remove``: ``probed`` with ``remove_aligned`` before the optimizer.

The timing over several processes is :mod:`gradlens_bench.world`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, cast

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradlens import Objective
from gradlens.training.distributed import distributed_probed_step
from gradlens.transforms import remove_aligned
from gradlens_bench.contract import Prepare, Run
from gradlens_bench.models import Workload
from gradlens_bench.step import StepWorkload

__all__ = ["Mode", "ddp_step", "process_group"]

Mode = Literal["plain", "probed", "lean", "remove"]


@contextmanager
def process_group() -> Iterator[None]:
    """The initialised process group, or a gloo group of this one process while inside."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(trait: Objective) -> Objective:
    """This rank's rows of the trait batch (the last rows are dropped if they do not divide)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = trait.inputs.shape[0] // world
    rows = slice(rank * share, (rank + 1) * share)
    return Objective(trait.loss_fn, trait.inputs[rows], tuple(t[rows] for t in trait.targets))


def ddp_step(mode: Mode) -> Prepare:
    """(h) One DDP step of ``mode`` on the workload's student; see the module docstring."""

    @contextmanager
    def prepare(workload: Workload) -> Iterator[Run]:
        w = cast(StepWorkload, workload)
        with process_group():
            ddp = DistributedDataParallel(w.student)
            opt = w.optimizer
            train = Objective(w.train_loss, w.noise, (w.targets(),))
            trait = Objective(w.trait_loss, w.probe, (w.labels,))
            shard = _shard(trait)
            remove = remove_aligned()
            state = remove.init(dict(w.student.named_parameters()))

            def plain() -> None:
                loss = train.loss_fn(ddp(train.inputs), *train.targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            runs: dict[Mode, Run] = {
                "plain": plain,
                "probed": lambda: distributed_probed_step(ddp, opt, train, trait),
                "lean": lambda: distributed_probed_step(
                    ddp,
                    opt,
                    train,
                    shard,
                    trait_batch="sharded",
                    measure_change=False,
                    check_replicas=False,
                ),
                "remove": lambda: distributed_probed_step(
                    ddp, opt, train, trait, before=remove, before_state=state
                ),
            }
            yield runs[mode]

    return prepare
