"""The collectives of the data-parallel step: what ranks exchange, and how they agree.

Used by :mod:`gradlens.training.distributed`; every function here is called
on every rank of ``group`` (a collective left out on one rank hangs the others).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradlens.errors import GradlensError
from gradlens.probes.batch import examples, forward
from gradlens.probes.outputs import OutputSelector, select_output
from gradlens.probes.vmap import loss_and_grad
from gradlens.training.objective import Objective

__all__ = [
    "ProcessGroup",
    "ReplicaDivergenceError",
    "TraitBatch",
    "after_step_collective",
    "all_counts",
    "flat",
    "gather_examples",
    "global_gradient",
    "raise_together",
    "rank_and_world",
    "unflat",
]

T = TypeVar("T")

TraitBatch = Literal["replicated", "sharded"]
"""How the trait batch is laid out over the ranks."""

ProcessGroup = Any  # torch.distributed.ProcessGroup; None for the default group


class ReplicaDivergenceError(GradlensError, RuntimeError):
    """The ranks' parameters differ after a step: they no longer hold one model."""


def rank_and_world(group: ProcessGroup) -> tuple[int, int]:
    """``(rank, world)`` in ``group``, or a clear error without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed_probed_step needs a torch.distributed process group: call "
            "torch.distributed.init_process_group (torchrun sets its environment) first, "
            "or use probed_step in a single process."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def flat(values: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """``values`` in ``names`` order, flattened into one vector (one message)."""
    return torch.cat([values[n].reshape(-1) for n in names])


def unflat(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a :func:`flat` vector back into tensors shaped like ``like``."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vector[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def all_counts(count: int, device: torch.device, group: ProcessGroup) -> list[int]:
    """Every rank's ``count``, in rank order (one all-gather of one integer each)."""
    _, world = rank_and_world(group)
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    found = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(found, mine, group=group)
    return [int(f) for f in found]


def gather_examples(
    local: Tensor, *, sizes: list[int] | None = None, group: ProcessGroup = None
) -> Tensor:
    """Concatenate every rank's per-example values along ``example``, in rank order.

    The order is that of :func:`distributed_probed_step`'s ``example_cosine``:
    rank 0's examples first. Gather your own per-example labels with it (the
    dataset index of each example, say) to record them beside the cosines.

    Args:
        local: This rank's values, shape ``(example, ...)``; the trailing
            shape and the dtype must be the same on every rank, the number of
            examples may differ.
        sizes: Every rank's number of examples, if known (saves one all-gather).
        group: The process group; default the whole world.

    Returns:
        Shape ``(sum of examples, ...)``, the same on every rank.
    """
    _, world = rank_and_world(group)
    if sizes is None:
        sizes = all_counts(local.shape[0], local.device, group)
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    found = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(found, padded.contiguous(), group=group)
    return torch.cat([f[:n] for f, n in zip(found, sizes, strict=True)])


def global_gradient(
    model: nn.Module,
    trait: Objective,
    params: dict[str, Tensor],
    layout: TraitBatch,
    group: ProcessGroup,
    output: OutputSelector | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The global trait loss and gradient, the same bits on every rank."""
    names = list(params)
    count = examples(trait.inputs)
    if layout == "replicated" and count == 0:
        raise ValueError(
            "the trait batch is empty: with trait_batch='replicated' every rank needs the whole "
            "trait batch (rank 0's is the one used); give trait= at least one example."
        )
    if count > 0:
        loss, g_t = loss_and_grad(model, trait.loss_fn, trait.inputs, *trait.targets, output=output)
    else:  # an empty shard adds nothing to the weighted sums
        loss = next(iter(params.values())).new_zeros(())
        g_t = {n: torch.zeros_like(p) for n, p in params.items()}
    if layout == "replicated":
        message = torch.cat([loss.reshape(1), flat(g_t, names)])
        dist.broadcast(message, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        return message[0], unflat(message[1:], params)
    weight = loss.new_tensor([float(count)])
    message = torch.cat([weight, loss.reshape(1) * count, flat(g_t, names) * count])
    dist.all_reduce(message, group=group)
    total = message[0]
    if total == 0:
        raise ValueError(
            "the trait batch is empty on every rank: give trait= at least one example "
            "on some rank (trait_batch='sharded' splits it over the ranks)."
        )
    return message[1] / total, unflat(message[2:] / total, params)


def fingerprint(values: Mapping[str, Tensor]) -> Tensor:
    """Each tensor's sum and norm, accumulated in float64: ``(tensor, 2)``.

    Equal tensors give equal bits; a divergence that leaves both unchanged
    is not caught.
    """
    return torch.stack(
        [
            torch.stack(
                [
                    v.detach().sum(dtype=torch.float64),
                    torch.linalg.vector_norm(v.detach().double()),
                ]
            )
            for v in values.values()
        ]
    )


def after_step_collective(
    model: nn.Module,
    trait: Objective | None,
    layout: TraitBatch,
    params: dict[str, Tensor],
    check: bool,
    step: int | None,
    group: ProcessGroup,
    output: OutputSelector | None = None,
) -> Tensor | None:
    """The global trait loss at the new parameters (with ``trait``) and the replica check.

    One all-gather carries both: every rank's trait loss on its trait batch
    and its count, and every rank's :func:`_fingerprint` of the parameters and
    of the floating-point buffers (BatchNorm's running statistics, say).

    Raises:
        ReplicaDivergenceError: On every rank, if ``check`` and any rank's
            parameters or buffers differ from rank 0's.
    """
    _, world = rank_and_world(group)
    reference = next(iter(params.values()))
    parts = []
    if trait is not None:
        count = examples(trait.inputs)
        loss = reference.new_zeros((), dtype=torch.float64)
        if count > 0:
            with torch.no_grad():
                out = select_output(forward(model, trait.inputs), output)
                loss = trait.loss_fn(out, *trait.targets).detach().double()
        parts.append(torch.stack([loss.new_tensor(float(count)), loss]))
    watched = {
        **params,
        **{n: b for n, b in model.named_buffers() if b.is_floating_point() and b.numel() > 0},
    }
    if check:
        parts.append(fingerprint(watched).reshape(-1))
    if not parts:
        return None
    mine = torch.cat(parts).to(reference.device)
    found = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(found, mine, group=group)
    if check:
        names = list(watched)
        prints = [f[-2 * len(names) :].reshape(-1, 2) for f in found]
        differ = {
            rank: [n for n, a, b in zip(names, f, prints[0], strict=True) if not torch.equal(a, b)]
            for rank, f in enumerate(prints)
        }
        where = "; ".join(f"rank {r}: {bad}" for r, bad in differ.items() if bad)
        if where:
            raise ReplicaDivergenceError(
                f"after step {step}, the parameters or buffers differ from rank 0's ({where}): "
                "the ranks no longer hold one model. Start every rank from the same parameters "
                "and buffers (wrapping in DistributedDataParallel broadcasts rank 0's), give "
                "every rank the same optimizer and transforms, and change parameters only "
                "through distributed_probed_step."
            )
    if trait is None:
        return None
    if layout == "replicated":
        return found[0][1].to(reference.dtype)  # rank 0's, as the reference was
    counts, losses = torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])
    return ((counts * losses).sum() / counts.sum()).to(reference.dtype)


def raise_together(work: Callable[[], T], group: ProcessGroup, device: torch.device) -> T:
    """Run ``work`` on every rank; if it raises on any rank, raise on every rank at once.

    One all-reduce of one flag per rank, so no rank is left waiting in a
    collective for a rank that refused the step. Errors other than gradlens's
    refusals (``GradlensError``, ``ValueError``, ``TypeError``) propagate as
    they are.

    Returns:
        What ``work`` returned.
    """
    rank, world = rank_and_world(group)
    failure: Exception | None = None
    result = None
    try:
        result = work()
    except (GradlensError, ValueError, TypeError) as err:
        failure = err
    flags = torch.zeros(world, device=device)
    flags[rank] = float(failure is not None)
    dist.all_reduce(flags, group=group)
    if failure is not None:
        raise failure
    failed = [r for r in range(world) if flags[r] > 0]
    if failed:
        raise GradlensError(
            f"ranks {failed} refused this step (their error names the cause and the fix); "
            f"rank {rank} stops with them instead of waiting in a collective."
        )
    return result  # type: ignore[return-value]
