"""Time of a probed DDP step against a plain DDP step, one process per rank.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.ddp_overhead --out OUT

Every rank builds the same model and takes, in turn, blocks of ``steps``
steps of each mode, the blocks interleaved (plain, probed, probed + remove,
plain, ...) so that a change in the machine's load hits every mode alike.
A barrier precedes each block's first clock read and follows its last step,
so a block's time is that of the whole group. Modes:

- ``plain``: ``DistributedDataParallel`` forward, ``backward`` (DDP's
  bucketed all-reduce, overlapped with the backward) and an SGD step;
- ``probed``: :func:`~gradlens.training.distributed.distributed_probed_step`
  with its defaults (trait gradient, per-example probe, trait loss after the
  step, replica check), no transform;
- ``probed_lean``: the same without the trait loss after the step and the
  replica check, and with the trait batch sharded over the ranks;
- ``probed_remove``: ``probed`` with ``remove_aligned`` before the optimizer.

Rank 0 writes ``overhead.json`` (every block's time, the medians and the
ratios to ``plain``) and ``overhead.md`` (the table) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from experiments.ddp_distill import Config as DistillConfig
from experiments.ddp_distill import TinyTransformer, distill_loss, trait_loss
from gradlens import Objective
from gradlens.provenance import run_provenance
from gradlens.training.distributed import distributed_probed_step
from gradlens.transforms import remove_aligned

MODES = ("plain", "probed", "probed_lean", "probed_remove")


def mlp() -> tuple[nn.Module, Callable[[int, int], Objective], Objective]:
    """The MNIST-sized MLP (784-256-256-10): every parameter on the ghost path."""
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )

    def batch(size: int, seed: int) -> Objective:
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(size, 784, generator=gen)
        return Objective(F.mse_loss, x, (torch.randn(size, 10, generator=gen),))

    gen = torch.Generator().manual_seed(1)
    trait = Objective(
        F.cross_entropy, torch.rand(64, 784, generator=gen), (torch.randint(0, 10, (64,)),)
    )
    return model, batch, trait


def transformer() -> tuple[nn.Module, Callable[[int, int], Objective], Objective]:
    """The example's tiny transformer (experiments/ddp_distill.py), distilled from a copy."""
    config = DistillConfig()
    model, teacher = TinyTransformer(config), TinyTransformer(config).requires_grad_(False)

    def batch(size: int, seed: int) -> Objective:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randint(0, config.vocab, (size, config.length), generator=gen)
        with torch.no_grad():
            return Objective(distill_loss, x, (teacher(x),))

    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, config.vocab, (64, config.length), generator=gen)
    trait = Objective(trait_loss, prompts, (torch.full((64,), config.trait_token),))
    return model, batch, trait


WORKLOADS = {"mlp": mlp, "transformer": transformer}


def plain_step(ddp: nn.Module, opt: torch.optim.Optimizer, train: Objective) -> None:
    """One ordinary DDP step."""
    loss = train.loss_fn(ddp(train.inputs), *train.targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_workload(name: str, batch: int, steps: int, blocks: int) -> dict[str, list[float]]:
    """Seconds per step of every block of every mode, for one workload."""
    torch.manual_seed(0)
    model, make_batch, trait = WORKLOADS[name]()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    remove = remove_aligned()
    state = remove.init(dict(model.named_parameters()))
    train = make_batch(batch, 100 + dist.get_rank())
    rank, world = dist.get_rank(), dist.get_world_size()
    share = trait.inputs.shape[0] // world
    rows = slice(rank * share, (rank + 1) * share)
    trait_shard = Objective(
        trait.loss_fn, trait.inputs[rows], tuple(t[rows] for t in trait.targets)
    )

    def run(mode: str) -> None:
        if mode == "plain":
            plain_step(ddp, opt, train)
        elif mode == "probed":
            distributed_probed_step(ddp, opt, train, trait)
        elif mode == "probed_lean":
            distributed_probed_step(
                ddp,
                opt,
                train,
                trait_shard,
                trait_batch="sharded",
                measure_change=False,
                check_replicas=False,
            )
        else:
            distributed_probed_step(ddp, opt, train, trait, before=remove, before_state=state)

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:  # warm-up
        for _ in range(2):
            run(mode)
    for _ in range(blocks):
        for mode in MODES:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                run(mode)
            dist.barrier()
            times[mode].append((time.perf_counter() - start) / steps)
    return times


def parameter_count(name: str) -> tuple[int, int]:
    """``(P, tensors)`` of a workload's model."""
    params = list(WORKLOADS[name]()[0].parameters())
    return sum(p.numel() for p in params), len(params)


def table(results: dict) -> str:
    """The markdown table of the medians and ratios."""
    lines = [
        "| workload | P | tensors | batch per rank | trait batch | plain ms | probed ms "
        "| probed lean ms | probed + remove_aligned ms | probed / plain | probed lean / plain "
        "| probed + remove / plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, found in results["workloads"].items():
        m, r = found["median_ms"], found["ratio_to_plain"]
        lines.append(
            f"| {name} | {found['parameters']} | {found['tensors']} | {results['batch']} | 64 "
            f"| {m['plain']:.2f} | {m['probed']:.2f} | {m['probed_lean']:.2f} "
            f"| {m['probed_remove']:.2f} | {r['probed']:.2f} | {r['probed_lean']:.2f} "
            f"| {r['probed_remove']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Time every workload and, on rank 0, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for overhead.json/.md")
    parser.add_argument("--batch", type=int, default=32, help="training examples per rank")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks per mode")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    provenance = run_provenance()
    load_before = os.getloadavg()
    found = {}
    for name in WORKLOADS:
        times = time_workload(name, args.batch, args.steps, args.blocks)
        medians = {mode: 1e3 * statistics.median(t) for mode, t in times.items()}
        count, tensors = parameter_count(name)
        found[name] = {
            "parameters": count,
            "tensors": tensors,
            "seconds_per_step": times,
            "median_ms": medians,
            "ratio_to_plain": {m: medians[m] / medians["plain"] for m in MODES},
        }
    if dist.get_rank() == 0:
        results = {
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "batch": args.batch,
            "steps_per_block": args.steps,
            "blocks": args.blocks,
            "threads_per_rank": args.threads,
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            # The machine is shared: its 1-minute load average before and after the run.
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
            **provenance.attrs(),
            "workloads": found,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "overhead.md").write_text(table(results))
        print(table(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
