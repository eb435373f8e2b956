"""One probed training step under data parallelism (``torch.distributed``, DDP).

:func:`distributed_probed_step` is :func:`~gradlens.training.probed_step` for
``world`` processes that each hold a replica of the model and a shard of the
training batch (``torchrun``; any backend, gloo on CPU, NCCL on GPUs). It
takes the step that one process would take on the concatenation of the
shards, in rank order, and returns the same :class:`StepResult`:

- The probe passes run on the wrapped module (``model.module`` of a
  ``DistributedDataParallel``) through gradlens's functional calls, so DDP's
  reducer never fires: no hidden synchronisation, no ``no_sync`` needed.
- The trait gradient ``g_t`` is global. With ``trait_batch="replicated"``
  (default) every rank holds the whole trait batch and computes ``g_t``, and
  rank 0's copy is broadcast, so every rank holds the same bits even where
  kernels are not deterministic. With ``"sharded"`` every rank holds a shard
  and the shard gradients are all-reduced, weighted by shard size.
- The training gradient is the global mean over examples,
  ``g = sum_r n_r g_r / N``, from one all-reduce (with equal shards this is
  what DDP computes, ``mean_r g_r``; with unequal shards it is still the mean
  over all ``N`` examples, which DDP's mean of means is not).
- Each rank computes its examples' dots ``<g_i, g_t>`` and squared norms
  locally against the global ``g_t``; these ``2 x tensors`` numbers per
  example (and the losses) are all-gathered, so every rank holds them for the
  global batch, in rank order (:func:`gather_examples` gives the same order
  for your own per-example labels, such as dataset indices).
- The transforms then run on every rank on identical inputs (global ``g``,
  global ``g_t``, global ``example_dots``): a per-example transform averages
  over all ``N`` examples, not over the rank's own. Every rank takes the same
  optimizer step; with ``check_replicas`` a checksum of every parameter is
  compared across ranks after the step, and a difference raises
  :class:`ReplicaDivergenceError` on every rank.

Every record is therefore the same on every rank: write them from rank 0
alone (one ordinary run file, read back with :func:`~gradlens.open_run`).
Every error this function raises on purpose is raised on every rank at once,
so no rank is left waiting in a collective.

Example (run under ``torchrun --nproc-per-node 2``; see
``experiments/ddp_distill.py``)::

    dist.init_process_group("gloo")
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out = distributed_probed_step(ddp, opt, train_shard, trait, before=tx, before_state=state)
    if dist.get_rank() == 0:
        recorder.log(step, **step_values(out, layout))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gradlens.alignment import alignment, example_alignment, summarize
from gradlens.errors import GradlensError
from gradlens.ghost import Method, probe_batch
from gradlens.gradops import check_finite, dot, norm, safe_divide, scale
from gradlens.per_example import Randomness, loss_and_grad
from gradlens.training.step import Objective, StepResult
from gradlens.transforms.base import GradientTransform

__all__ = [
    "ReplicaDivergenceError",
    "TraitBatch",
    "distributed_probed_step",
    "gather_examples",
]

TraitBatch = Literal["replicated", "sharded"]
"""How the trait batch is laid out over the ranks."""

ProcessGroup = Any  # torch.distributed.ProcessGroup; None for the default group


class ReplicaDivergenceError(GradlensError, RuntimeError):
    """The ranks' parameters differ after a step: they no longer hold one model."""


def _world(group: ProcessGroup) -> tuple[int, int]:
    """``(rank, world)`` in ``group``, or a clear error without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed_probed_step needs a torch.distributed process group: call "
            "torch.distributed.init_process_group (torchrun sets its environment) first, "
            "or use probed_step in a single process."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _flat(values: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([values[n].reshape(-1) for n in names])


def _unflat(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def _sizes(count: int, device: torch.device, group: ProcessGroup) -> list[int]:
    """Every rank's ``count``, in rank order (one all-gather of one integer each)."""
    _, world = _world(group)
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
    _, world = _world(group)
    if sizes is None:
        sizes = _sizes(local.shape[0], local.device, group)
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    found = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(found, padded.contiguous(), group=group)
    return torch.cat([f[:n] for f, n in zip(found, sizes, strict=True)])


def _trait_gradient(
    model: nn.Module,
    trait: Objective,
    params: dict[str, Tensor],
    layout: TraitBatch,
    group: ProcessGroup,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The global trait loss and gradient, the same bits on every rank."""
    names = list(params)
    count = trait.inputs.shape[0]
    if layout == "replicated" and count == 0:
        raise ValueError(
            "the trait batch is empty: with trait_batch='replicated' every rank needs the whole "
            "trait batch (rank 0's is the one used); give trait= at least one example."
        )
    if count > 0:
        loss, g_t = loss_and_grad(model, trait.loss_fn, trait.inputs, *trait.targets)
    else:  # an empty shard adds nothing to the weighted sums
        loss = next(iter(params.values())).new_zeros(())
        g_t = {n: torch.zeros_like(p) for n, p in params.items()}
    if layout == "replicated":
        message = torch.cat([loss.reshape(1), _flat(g_t, names)])
        dist.broadcast(message, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        return message[0], _unflat(message[1:], params)
    weight = loss.new_tensor([float(count)])
    message = torch.cat([weight, loss.reshape(1) * count, _flat(g_t, names) * count])
    dist.all_reduce(message, group=group)
    total = message[0]
    if total == 0:
        raise ValueError(
            "the trait batch is empty on every rank: give trait= at least one example "
            "on some rank (trait_batch='sharded' splits it over the ranks)."
        )
    return message[1] / total, _unflat(message[2:] / total, params)


def _fingerprint(params: Mapping[str, Tensor]) -> Tensor:
    """Each parameter's sum and norm, accumulated in float64: ``(tensor, 2)``.

    Equal parameters give equal bits; a divergence that leaves both unchanged
    is not caught.
    """
    return torch.stack(
        [
            torch.stack(
                [
                    p.detach().sum(dtype=torch.float64),
                    torch.linalg.vector_norm(p.detach(), dtype=torch.float64),
                ]
            )
            for p in params.values()
        ]
    )


def _after_step(
    model: nn.Module,
    trait: Objective | None,
    layout: TraitBatch,
    params: dict[str, Tensor],
    check: bool,
    step: int | None,
    group: ProcessGroup,
) -> Tensor | None:
    """The global trait loss at the new parameters (with ``trait``) and the replica check.

    One all-gather carries both: every rank's trait loss on its trait batch
    and its count, and every rank's :func:`_fingerprint`.

    Raises:
        ReplicaDivergenceError: On every rank, if ``check`` and any rank's
            parameters differ from rank 0's.
    """
    _, world = _world(group)
    reference = next(iter(params.values()))
    parts = []
    if trait is not None:
        count = trait.inputs.shape[0]
        loss = reference.new_zeros((), dtype=torch.float64)
        if count > 0:
            with torch.no_grad():
                loss = trait.loss_fn(model(trait.inputs), *trait.targets).detach().double()
        parts.append(torch.stack([loss.new_tensor(float(count)), loss]))
    if check:
        parts.append(_fingerprint(params).reshape(-1))
    if not parts:
        return None
    mine = torch.cat(parts).to(reference.device)
    found = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(found, mine, group=group)
    if check:
        names = list(params)
        prints = [f[-2 * len(names) :].reshape(-1, 2) for f in found]
        differ = {
            rank: [n for n, a, b in zip(names, f, prints[0], strict=True) if not torch.equal(a, b)]
            for rank, f in enumerate(prints)
        }
        where = "; ".join(f"rank {r}: {bad}" for r, bad in differ.items() if bad)
        if where:
            raise ReplicaDivergenceError(
                f"after step {step}, the parameters differ from rank 0's ({where}): the ranks "
                "no longer hold one model. Start every rank from the same parameters (wrapping "
                "in DistributedDataParallel broadcasts rank 0's), give every rank the same "
                "optimizer and transforms, and change parameters only through "
                "distributed_probed_step."
            )
    if trait is None:
        return None
    if layout == "replicated":
        return found[0][1].to(reference.dtype)  # rank 0's, as the reference was
    counts, losses = torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])
    return ((counts * losses).sum() / counts.sum()).to(reference.dtype)


def distributed_probed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Objective,
    trait: Objective,
    *,
    trait_batch: TraitBatch = "replicated",
    group: ProcessGroup = None,
    before: GradientTransform | None = None,
    before_state: Any = None,
    after: GradientTransform | None = None,
    after_state: Any = None,
    step: int | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    measure_change: bool = True,
    check_replicas: bool = True,
) -> StepResult:
    """Take one data-parallel optimizer step on ``train`` while probing it against ``trait``.

    Call it on every rank of ``group`` with that rank's shard of the training
    batch; the step and every record are those of
    :func:`~gradlens.training.probed_step` on the concatenation of the shards
    in rank order (see the module docstring for what is communicated).

    Args:
        model: The student: a ``DistributedDataParallel`` (its ``.module`` is
            probed) or a plain module replicated on every rank.
        optimizer: A ``torch.optim`` optimizer over the model's parameters,
            the same on every rank.
        train: This rank's shard of the training batch; shards may differ in size.
        trait: The trait objective: the whole trait batch on every rank
            (``trait_batch="replicated"``) or this rank's shard of it (``"sharded"``,
            for a mean-reduced loss).
        trait_batch: ``"replicated"`` or ``"sharded"``.
        group: The process group; default the whole world.
        before: Transform applied to the global ``g`` before the optimizer.
        before_state: Its state (the same on every rank).
        after: Transform applied to the optimizer's update.
        after_state: Its state.
        step: The step number, for error messages.
        method: ``per_example_dots`` method for the per-example probe.
        chunk_size: Examples per chunk where the probe falls back to ``vmap``.
        randomness: ``vmap`` randomness, as in :func:`~gradlens.per_example_grads`.
        measure_change: Also evaluate the trait loss after the step.
        check_replicas: Compare a checksum of the parameters across ranks after the step.

    Returns:
        A :class:`~gradlens.training.StepResult` of the global batch, the same
        on every rank; ``example_cosine`` has shape ``(sum of examples,)``.

    Raises:
        NonFiniteGradientError: If ``g_t`` or ``g`` has NaN or infinite values.
        ReplicaDivergenceError: If the ranks' parameters differ after the step.
        ValueError: For an unknown ``trait_batch``, or no training or trait
            example on any rank.
    """
    if trait_batch not in ("replicated", "sharded"):
        raise ValueError(f"trait_batch must be 'replicated' or 'sharded', not {trait_batch!r}.")
    _world(group)
    module = model.module if isinstance(model, DistributedDataParallel) else model
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    names = list(params)
    old = {n: p.detach().clone() for n, p in params.items()}

    trait_loss, g_t = _trait_gradient(module, trait, old, trait_batch, group)
    check_finite(g_t, step=step, what="trait gradient")
    probe = probe_batch(
        module,
        train.loss_fn,
        train.inputs,
        *train.targets,
        reference=g_t,
        method=method,
        chunk_size=chunk_size,
        randomness=randomness,
    )
    count = train.inputs.shape[0]
    rank, world = _world(group)
    # One all-reduce: every rank's example count (at its own index) and count x mean gradient.
    counts = g_t[names[0]].new_zeros(world)
    counts[rank] = count
    message = torch.cat([counts, _flat(probe.grad, names).to(counts.dtype) * count])
    dist.all_reduce(message, group=group)
    sizes = [round(float(n)) for n in message[:world]]
    total = sum(sizes)
    if total == 0:
        raise ValueError(
            f"the training batch is empty on every rank at step {step}: give train= at least "
            "one example on some rank."
        )
    grads = _unflat(message[world:] / total, params)
    check_finite(grads, step=step, what="training gradient")
    local = torch.stack(
        [probe.losses.to(message.dtype)]
        + [probe.dots[n].to(message.dtype) for n in names]
        + [probe.sq_norms[n].to(message.dtype) for n in names],
        dim=1,
    )  # (example, 1 + 2 tensors)
    gathered = gather_examples(local, sizes=sizes, group=group)
    losses = gathered[:, 0]
    dots = {n: gathered[:, 1 + i] for i, n in enumerate(names)}
    sq_norms = {n: gathered[:, 1 + len(names) + i] for i, n in enumerate(names)}

    align = alignment(grads, reference=g_t)
    per_example = example_alignment(dots, sq_norms, reference=g_t)
    if before is not None:
        grads, before_state = before.update(
            grads, before_state, old, reference=g_t, example_dots=dots
        )
    for name, p in params.items():
        p.grad = grads[name].detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        delta = {n: p.detach() - old[n] for n, p in params.items()}
        if after is not None:
            delta, after_state = after.update(delta, after_state, old, reference=scale(g_t, -1.0))
            for name, p in params.items():
                p.copy_(old[name] + delta[name])
    trait_after = _after_step(
        module, trait if measure_change else None, trait_batch, params, check_replicas, step, group
    )

    predicted = dot(g_t, delta)
    summary = summarize(per_example.cosine)
    records = {
        "train_loss": losses.mean(),
        "trait_loss": trait_loss,
        "cosine": align.cosine,
        "trait_norm": align.reference_norm,
        "train_norm": align.norm,
        "projection": align.projection,
        "layer_cosine": align.layer_cosine,
        "layer_trait_norm": align.layer_reference_norm,
        "layer_train_norm": align.layer_norm,
        "update_cosine": safe_divide(predicted, align.reference_norm * norm(delta)),
        "predicted_change": predicted,
        "example_cosine_mean": summary["mean"],
        "example_cosine_quantile": summary["quantile"],
        "example_cosine_frac_positive": summary["frac_positive"],
    }
    if trait_after is not None:
        records["measured_change"] = trait_after - trait_loss
    return StepResult(records, per_example.cosine, before_state, after_state)
