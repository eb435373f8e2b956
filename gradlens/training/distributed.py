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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gradlens.probes.batch import examples
from gradlens.probes.ghost import Method
from gradlens.probes.outputs import OutputSelector, plain_forward
from gradlens.probes.vmap import Randomness, check_vmap_compatible
from gradlens.training.amortise import TraitCache
from gradlens.training.body import StepResult, run_step
from gradlens.training.checks import check_objective, check_optimizer
from gradlens.training.collectives import (
    ProcessGroup,
    ReplicaDivergenceError,
    TraitBatch,
    after_step_collective,
    flat,
    gather_examples,
    global_gradient,
    raise_together,
    rank_and_world,
    unflat,
)
from gradlens.training.mode import ModeProbe, micro_batches
from gradlens.training.objective import Objective
from gradlens.training.step import SingleMode
from gradlens.transforms.base import GradientTransform

__all__ = [
    "ReplicaDivergenceError",
    "TraitBatch",
    "distributed_probed_step",
    "gather_examples",
]


class DistributedMode(SingleMode):
    """A rank's shard of a data-parallel batch: the collectives of the step body."""

    def __init__(
        self,
        module: nn.Module,
        *,
        trait_batch: TraitBatch,
        group: ProcessGroup,
        check_replicas: bool,
        method: Method,
        chunk_size: int | None,
        randomness: Randomness,
        output: OutputSelector | None,
    ) -> None:
        super().__init__(
            module, method=method, chunk_size=chunk_size, randomness=randomness, output=output
        )
        self.trait_batch: TraitBatch = trait_batch
        self.group = group
        self.check_replicas = check_replicas

    def gradient(self, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """The global loss and gradient, the same bits on every rank."""
        old = {n: p.detach() for n, p in self.params.items()}
        return global_gradient(
            self.model, objective, old, self.trait_batch, self.group, self.output
        )

    def probe(self, train: Objective, references: list[Mapping[str, Tensor]]) -> ModeProbe:
        """The local probe, then one all-reduce (gradient, loss, parts) and one all-gather.

        The all-reduce carries every rank's example count (at its own index)
        and ``count x`` its mean gradient, loss and parts; the all-gather the
        examples' dots and squared norms, in rank order.
        """
        # The local probe refuses a loss that is not a mean of the examples' losses: on every rank.
        local = raise_together(
            lambda: super(DistributedMode, self).probe(train, references),
            self.group,
            next(iter(self.params.values())).device,
        )
        names = list(self.params)
        count = examples(train.inputs)
        rank, world = rank_and_world(self.group)
        first = local.grad[names[0]]
        counts = first.new_zeros(world)
        counts[rank] = count
        scalars = [local.loss, *local.parts.values()]
        weighted = [v.to(first.dtype) * count if count else first.new_zeros(()) for v in scalars]
        message = torch.cat(
            [counts, torch.stack(weighted), flat(local.grad, names).to(first.dtype) * count]
        )
        dist.all_reduce(message, group=self.group)
        sizes = [round(float(n)) for n in message[:world]]
        total = sum(sizes)
        if total == 0:
            raise ValueError(
                "the training batch is empty on every rank: give train= at least one example "
                "on some rank."
            )
        means = message[world : world + len(scalars)] / total
        grads = unflat(message[world + len(scalars) :] / total, self.params)
        columns = [dots[n].to(message.dtype) for dots in local.dots for n in names]
        columns += [local.sq_norms[n].to(message.dtype) for n in names]
        gathered = gather_examples(torch.stack(columns, dim=1), sizes=sizes, group=self.group)
        k = len(names)
        dots = [
            {n: gathered[:, r * k + i] for i, n in enumerate(names)} for r in range(len(local.dots))
        ]
        start = len(local.dots) * k
        sq_norms = {n: gathered[:, start + i] for i, n in enumerate(names)}
        parts = dict(zip(local.parts, means[1:], strict=True))
        return ModeProbe(means[0], grads, dots, sq_norms, parts, local.plan)

    def after_step(self, trait: Objective | None, step: int | None) -> Tensor | None:
        """The global trait loss at the new parameters, and the replica check."""
        return after_step_collective(
            self.model,
            trait,
            self.trait_batch,
            self.params,
            self.check_replicas,
            step,
            self.group,
            self.output,
        )


def distributed_probed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Objective | Sequence[Objective],
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
    output: OutputSelector | None = None,
    measure_change: bool = True,
    check_replicas: bool = True,
    heldout: Objective | None = None,
    reference: Objective | None = None,
    momentum: bool = False,
    trait_cache: TraitCache | None = None,
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
        train: This rank's shard of the training batch (shards may differ in size), or its
            micro-batches (gradient accumulation, as in :func:`~gradlens.training.probed_step`).
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
        output: Which tensor of the model's return value the losses see, as in
            :func:`~gradlens.training.probed_step`.
        measure_change: Also evaluate the trait loss after the step.
        check_replicas: Compare a checksum of the parameters and floating-point
            buffers across ranks after the step.
        heldout: A held-out trait objective, laid out as ``trait``; see
            :func:`~gradlens.training.probed_step`.
        reference: The transforms act along this objective's gradient (laid out
            as ``trait``) instead of ``g_t``.
        momentum: Record ``momentum_cosine``.
        trait_cache: Take the trait gradient every few steps and reuse it in
            between: :func:`~gradlens.training.reuse_trait` on the first step, then
            the last result's ``trait_cache``; records ``trait_age``, and
            ``measured_change`` is NaN on the steps that reuse ``g_t``.

    Returns:
        A :class:`~gradlens.training.StepResult` of the global batch, the same
        on every rank; ``example_cosine`` has shape ``(sum of examples,)``.

    Raises:
        NonFiniteGradientError: If ``g_t`` or ``g`` has NaN or infinite values.
        ReplicaDivergenceError: If the ranks' parameters differ after the step.
        ValueError: For an unknown ``trait_batch``, no training or trait
            example on any rank, an optimizer that does not hold the model's
            parameters, or a training loss that is not mean-reduced.
        UnsupportedModelError: As :func:`~gradlens.training.probed_step`.
        GradlensError: On every other rank, when one rank refuses the step.
    """
    if trait_batch not in ("replicated", "sharded"):
        raise ValueError(f"trait_batch must be 'replicated' or 'sharded', not {trait_batch!r}.")
    rank_and_world(group)
    module = model.module if isinstance(model, DistributedDataParallel) else model
    mode = DistributedMode(
        module,
        trait_batch=trait_batch,
        group=group,
        check_replicas=check_replicas,
        method=method,
        chunk_size=chunk_size,
        randomness=randomness,
        output=output,
    )

    batches = micro_batches(train)

    def checks() -> None:
        for batch in batches:
            check_objective("train", batch, allow_empty=True)
        for which, objective in (("trait", trait), ("heldout", heldout), ("reference", reference)):
            if objective is not None:
                check_objective(which, objective, allow_empty=trait_batch == "sharded")
        check_optimizer(optimizer, mode.params)
        check_vmap_compatible(module, randomness)

    # Everything that can be refused is refused, on every rank, before any forward.
    raise_together(checks, group, next(iter(mode.params.values())).device)
    with plain_forward(module):
        return run_step(
            mode,
            optimizer,
            train,
            trait,
            before=before,
            before_state=before_state,
            after=after,
            after_state=after_state,
            step=step,
            measure_change=measure_change,
            heldout=heldout,
            reference=reference,
            momentum=momentum,
            trait_cache=trait_cache,
        )
