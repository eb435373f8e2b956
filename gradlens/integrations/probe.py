"""A probed step around another trainer's optimizer step: what the integrations share.

A trainer (``transformers.Trainer``, TRL's trainers, Lightning) owns the loop:
it runs the forward and backward of each micro-batch, accumulates ``.grad``
(and all-reduces it under data parallelism), may clip it, and steps the
optimizer. :class:`TrainerProbe` runs the two halves of the step body
(:mod:`gradlens.training.body`) around that step, from two hook points:

1. :meth:`TrainerProbe.pre_step`, after accumulation and before the optimizer:
   :func:`~gradlens.training.body.before_optimizer` with the accumulated
   ``.grad`` as ``g``: the trait gradient ``g_t`` on the trait batch
   (``torch.autograd.grad``, so ``.grad`` is not touched), the alignment of
   ``.grad`` with it, globally and per layer, the held-out records, and the
   ``before`` transform applied to ``.grad`` in place (reference ``g_t``);
2. :meth:`TrainerProbe.post_step`, after the optimizer:
   :func:`~gradlens.training.body.after_optimizer`: the ``after`` transform of
   the update (the parameters are set to ``old + after(update)``), the
   update's alignment, the first-order predicted and the measured trait-loss
   change; the row is logged to a :class:`~gradlens.Recorder` declared with
   :func:`~gradlens.training.step_variables`, so the file has the layout of a
   :func:`~gradlens.training.probed_step` run.

Per-example values need the training batch: :meth:`TrainerProbe.example_pass`
runs :func:`~gradlens.probe_batch` on one micro-batch (one more forward and
backward), and :meth:`pre_step` checks that the examples it saw make up the
gradient the trainer accumulated. Without it the per-example records
(``train_loss``, ``example_cosine_*``) are left out (NaN in the run file).

The records are the step body's own, so they are those of
:func:`~gradlens.training.probed_step`; ``tests/integrations`` checks every
one against it on the same batches in float64.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.alignment.layerstats import groups_for
from gradlens.errors import UnsupportedModelError
from gradlens.integrations.examples import ExampleValues
from gradlens.integrations.mode import TrainerMode, to_device
from gradlens.probes.batch import Inputs
from gradlens.probes.outputs import OutputSelector, plain_forward
from gradlens.probes.vmap import LossFn, Randomness, check_vmap_compatible
from gradlens.records.recorder import Recorder
from gradlens.training.amortise import TraitCache, reuse_trait
from gradlens.training.body import Pending, StepResult, after_optimizer, before_optimizer
from gradlens.training.checks import check_after, check_objective
from gradlens.training.mode import ModeProbe
from gradlens.training.objective import Objective
from gradlens.training.records import (
    OPTIONAL_RECORDS,
    TransformLayout,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.training.step import SingleMode
from gradlens.transforms.base import GradientTransform, needs_example_dots

__all__ = ["LOGGED", "TrainerProbe"]

LOGGED = ("cosine", "applied_cosine", "update_cosine", "projection", "trait_loss")
"""The scalar records handed to the trainer's logging by default (mean since the last log)."""


class TrainerProbe:
    """The measurements, transforms and records of a probed step inside another trainer.

    Framework-neutral: the callbacks of :mod:`gradlens.integrations.hf` and
    :mod:`gradlens.integrations.lightning` call :meth:`start` once,
    :meth:`example_pass` per micro-batch (optional), :meth:`pre_step` before
    and :meth:`post_step` after each optimizer step, and :meth:`finish`.

    Args:
        trait: The trait objective (a fixed probe batch), on the model's device
            or on the CPU (moved at :meth:`start`).
        before: A transform applied to ``.grad`` before the optimizer, with
            reference ``g_t`` (a per-example one needs :meth:`example_pass`).
        before_state: Its state; default ``before.init(params)`` at :meth:`start`.
        after: A transform applied to the optimizer's update, with reference
            ``-g_t``, as in :func:`~gradlens.probed_step` (a global one: the
            update has no per-example parts).
        after_state: Its state; default ``after.init(params)`` at :meth:`start`.
        output: Which tensor of the model's output the losses see (``"logits"``
            for a Hugging Face model), as in :func:`~gradlens.probed_step`.
        path: The netCDF run file; ``None`` keeps the rows in memory
            (:attr:`recorder`, ``recorder.dataset()``).
        overwrite: Replace an existing run file.
        config: Stored in the run file's attrs (a dataclass or Mapping).
        flush_every: Rows between writes of the run file.
        measure_change: Also evaluate the trait loss after each step (one
            forward without grad): ``measured_change``.
        heldout: A held-out trait objective (moved as ``trait``): records
            ``heldout_trait_loss``, ``heldout_cosine`` and ``heldout_update_cosine``
            (one more backward per step).
        momentum: Record ``momentum_cosine`` (the optimizer is then passed to
            :meth:`post_step`).
        trait_every: Take ``g_t`` every this many optimizer steps and reuse it
            in between (:func:`~gradlens.training.reuse_trait`): records
            ``trait_age``; ``measured_change`` is NaN where ``g_t`` is reused.
            ``None``: every step, no ``trait_age``.
        logged: The scalar records handed to the trainer's logging.
        record: Keep the rows in :attr:`recorder` (and ``path``). ``False``: no
            recorder, for a caller that logs each step's :attr:`result` to its own
            (with records of its own beside them); the trainer's logging still
            gets the ``logged`` scalars.

    Attributes:
        recorder: The run's :class:`~gradlens.Recorder` (after :meth:`start`).
        result: The last step's :class:`~gradlens.training.StepResult`, its
            records in the parameters' dtype.
        before_state: The ``before`` transform's current state.
        after_state: The ``after`` transform's current state.
        trait_cache: The amortised trait gradient's state (with ``trait_every``).
    """

    def __init__(
        self,
        trait: Objective,
        *,
        before: GradientTransform | None = None,
        before_state: Any = None,
        after: GradientTransform | None = None,
        after_state: Any = None,
        output: OutputSelector | None = None,
        path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        config: object | None = None,
        flush_every: int = 50,
        measure_change: bool = True,
        heldout: Objective | None = None,
        momentum: bool = False,
        trait_every: int | None = None,
        logged: tuple[str, ...] = LOGGED,
        record: bool = True,
    ) -> None:
        check_objective("trait", trait)
        if heldout is not None:
            check_objective("heldout", heldout)
        check_after(after)
        self.trait = trait
        self.heldout = heldout
        self.before = before
        self.before_state = before_state
        self.after = after
        self.after_state = after_state
        self.output = output
        self.path = path
        self.overwrite = overwrite
        self.config = config
        self.flush_every = flush_every
        self.measure_change = measure_change
        self.momentum = momentum
        self.trait_cache: TraitCache | None = (
            None if trait_every is None else reuse_trait(trait_every)
        )
        if path is not None and not record:
            raise ValueError(
                f"TrainerProbe(path={str(path)!r}, record=False) would write nothing to the "
                "path: pass record=True to keep the rows there, or path=None."
            )
        self.logged = logged
        self.record = record
        self.recorder: Recorder | None = None
        self.result: StepResult | None = None
        self.layout: TransformLayout | None = None
        self._mode: TrainerMode | None = None
        self._examples = ExampleValues()
        self._pending: Pending | None = None
        self._step = 0
        self._examples_size: int | None = None
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    # -- the run ---------------------------------------------------------------

    @property
    def stepping(self) -> bool:
        """Whether :meth:`pre_step` ran and :meth:`post_step` has not yet."""
        return self._pending is not None

    def start(self, model: nn.Module, *, record: bool = True) -> None:
        """Declare the run for ``model``'s trained parameters and open its recorder.

        Args:
            model: The model the trainer trains.
            record: Keep the rows (``False`` on all but one process of a
                data-parallel run: every process measures the same all-reduced
                gradient); with the constructor's ``record=False`` none are kept.
        """
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no parameter that requires grad: the probe "
                "measures the gradient of the trained ones."
            )
        device = next(iter(params.values())).device
        self.trait = to_device(self.trait, device)
        self.heldout = None if self.heldout is None else to_device(self.heldout, device)
        self._mode = TrainerMode(model, self.trait, self.output)
        detached = {n: p.detach() for n, p in params.items()}
        if self.before is not None and self.before_state is None:
            self.before_state = self.before.init(detached)
        if self.after is not None and self.after_state is None:
            self.after_state = self.after.init(detached)
        self.layout = transform_layout(params, before=self.before, after=self.after)
        if self.recorder is None and record and self.record:
            self.recorder = Recorder(
                self.path,
                step_variables(self.layout, optional=self._optional()),
                coords=step_coords(list(groups_for(list(params), "layer")), self.layout),
                config=self.config,
                flush_every=self.flush_every,
                overwrite=self.overwrite,
            )

    def _optional(self) -> list[str]:
        """The optional records this probe takes (:data:`~gradlens.training.OPTIONAL_RECORDS`)."""
        return [
            name
            for name in OPTIONAL_RECORDS
            if (name == "momentum_cosine" and self.momentum)
            or (name.startswith("heldout_") and self.heldout is not None)
            or (name == "trait_age" and self.trait_cache is not None)
        ]

    def finish(self, *, complete: bool = True) -> None:
        """Close the run file (``complete=False`` for a run that stopped early)."""
        if self.recorder is not None and self.path is not None:
            self.recorder.close(complete=complete)

    def _on(self, model: nn.Module) -> TrainerMode:
        """The step body's mode, on ``model`` (the one the trainer hands the hook)."""
        if self._mode is None:
            raise RuntimeError("TrainerProbe.start(model) was not called: call it before training.")
        self._mode.model = model
        return self._mode

    # -- per micro-batch ---------------------------------------------------------

    def trait_gradient(self, model: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        """``(trait loss, g_t)``, taken once per optimizer step (or reused, ``trait_every``)."""
        cache = self.trait_cache
        if cache is not None and not cache.due:
            assert cache.trait_loss is not None and cache.g_t is not None
            return cache.trait_loss, cache.g_t
        return self._on(model).gradient(self.trait)

    def example_pass(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Inputs,
        *targets: Tensor,
        randomness: Randomness = "error",
    ) -> None:
        """Per-example losses, dots with ``g_t`` and norms of one training micro-batch.

        One more forward and backward (:func:`~gradlens.probe_batch`: the
        factored path where a form applies, ``vmap`` elsewhere) beside the
        trainer's own; ``.grad`` is not touched. ``loss_fn(outputs, *targets)``
        must be the mean of the examples' losses and give the gradient the
        trainer accumulates (checked at :meth:`pre_step`).

        Args:
            model: The model, as the trainer calls it.
            loss_fn: The training loss, written for a batch, mean-reduced.
            inputs: The micro-batch (a tensor, or the batch dict without its targets).
            *targets: Its targets.
            randomness: As in :func:`~gradlens.probe_batch` (``"different"``
                for dropout; the trainer's own forward draws other masks, so the
                per-example values are those of another draw).
        """
        check_vmap_compatible(model, randomness)
        _, g_t = self.trait_gradient(model)
        batch = SingleMode(model, randomness=randomness, output=self.output)
        self._examples.add(batch.probe(Objective(loss_fn, inputs, tuple(targets)), [g_t]))

    # -- around the optimizer step ---------------------------------------------------

    def pre_step(self, model: nn.Module, step: int, *, max_norm: float | None = None) -> None:
        """The first half of the step body on the accumulated ``.grad``; ``before`` applied to it.

        Args:
            model: The model whose parameters the optimizer is about to step.
            step: The optimizer step (the record's ``step`` coordinate).
            max_norm: The norm ``.grad`` was clipped to before this call
                (``torch.nn.utils.clip_grad_norm_``), if it was; the per-example
                check then expects the clipped norm.

        Raises:
            UnsupportedModelError: If a trained parameter has no ``.grad``.
            NonFiniteGradientError: If ``g_t`` or ``.grad`` is not finite.
            GradientMismatchError: If per-example values were taken and their mean
                gradient is not the one the trainer accumulated.
            TypeError: For a per-example ``before`` without the per-example pass.
        """
        mode = self._on(model)
        missing = [n for n, p in mode.params.items() if p.grad is None]
        if missing:
            raise UnsupportedModelError(
                f"parameters {missing[:4]} require grad but have no .grad at the optimizer "
                "step: they took no part in the training loss. Freeze them "
                "(requires_grad_(False)) before training."
            )
        seen, self._examples = self._examples, ExampleValues()
        if self.before is not None and needs_example_dots(self.before) and not seen:
            raise TypeError(
                "before= is a per-example transform (it needs example_dots): take the "
                "per-example pass (ProbedTrainer for transformers, examples= for Lightning) "
                "or use its global form (remove_aligned, scale_aligned)."
            )
        g = {n: p.grad.detach() for n, p in mode.params.items()}  # type: ignore[union-attr]
        nan = g[next(iter(g))].new_full((), float("nan"))

        def accumulated(references: list[Mapping[str, Tensor]]) -> ModeProbe:
            del references  # one, g_t: the example passes took their dots with it
            return seen.probe(g, step, max_norm) if seen else ModeProbe(nan, g, [], {}, {})

        with plain_forward(model):
            pending = before_optimizer(
                mode,
                accumulated,
                self.trait,
                before=self.before,
                before_state=self.before_state,
                step=step,
                heldout=self.heldout,
                training="training gradient (.grad)",
                trait_cache=self.trait_cache,
            )
        if self.before is not None:
            with torch.no_grad():
                for name, p in mode.params.items():
                    p.grad.copy_(pending.applied[name])  # type: ignore[union-attr]
        self.before_state = pending.before_state
        self._pending = pending
        self._step = step

    def post_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, Tensor]:
        """The second half of the step body after the optimizer stepped; log the row.

        Args:
            model: The model the optimizer stepped.
            optimizer: The optimizer, for ``momentum=True`` (its first moment).

        Returns:
            The step's records, as :attr:`StepResult.records <gradlens.training.StepResult>`.
        """
        if self._pending is None:
            raise RuntimeError("post_step without pre_step: the probe saw no gradient this step.")
        if self.momentum and optimizer is None:
            raise ValueError(
                "TrainerProbe(momentum=True) records the optimizer's first moment: pass the "
                "optimizer to post_step (the callbacks do)."
            )
        pending, self._pending = self._pending, None
        mode = self._on(model)
        with plain_forward(model):
            result = after_optimizer(
                mode,
                pending,
                after=self.after,
                after_state=self.after_state,
                trait=self.trait if self.measure_change else None,
                step=self._step,
                momentum=optimizer if self.momentum else None,
            )
        mode.g_t = None
        self.after_state, self.trait_cache = result.after_state, result.trait_cache
        self.result = result
        records = result.records
        if self.recorder is not None:
            self.recorder.log(self._step, **step_values(result, self.layout))
            if result.example_cosine.numel():
                self.recorder.log(self._step, example_cosine=self._padded(result.example_cosine))
        for name in self.logged:
            if name in records:
                value = records[name].detach()
                self._sums[name] = self._sums.get(name, torch.zeros_like(value)) + value
        self._count += 1
        return records

    def _padded(self, values: Tensor) -> Tensor:
        """The per-example cosines to the run's ``example`` size: NaN after a short last step."""
        if self._examples_size is None:
            self._examples_size = len(values)
        size = self._examples_size
        if len(values) > size:
            raise ValueError(
                f"step {self._step} has {len(values)} examples but the run's first step had "
                f"{size}: the example dim of example_cosine is fixed by the first step. Make "
                "the first step a full one (shorter steps are padded with NaN), or drop "
                "short batches (dataloader_drop_last=True, DataLoader(drop_last=True))."
            )
        return torch.cat([values, values.new_full((size - len(values),), float("nan"))])

    def scalars(self, prefix: str = "gradlens/") -> dict[str, float]:
        """The logged records' means since the last call (one host sync), then reset."""
        if not self._count:
            return {}
        out = {f"{prefix}{n}": float(v) / self._count for n, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out
