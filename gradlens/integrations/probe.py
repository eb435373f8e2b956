"""A probed step around another trainer's optimizer step: what the integrations share.

A trainer (``transformers.Trainer``, TRL's trainers, Lightning) owns the loop:
it runs the forward and backward of each micro-batch, accumulates ``.grad``
(and all-reduces it under data parallelism), may clip it, and steps the
optimizer. :class:`TrainerProbe` measures that step from two hook points:

1. :meth:`TrainerProbe.pre_step`, after accumulation and before the optimizer:
   the trait gradient ``g_t`` on the trait batch (``torch.autograd.grad``, so
   ``.grad`` is not touched), the alignment of the accumulated ``.grad`` with
   it, globally and per layer, and the ``before`` transform applied to
   ``.grad`` in place (reference ``g_t``);
2. :meth:`TrainerProbe.post_step`, after the optimizer: the update's
   alignment, the first-order predicted and the measured trait-loss change;
   the row is logged to a :class:`~gradlens.Recorder` declared with
   :func:`~gradlens.training.step_variables`, so the file has the layout of a
   :func:`~gradlens.training.probed_step` run.

Per-example values need the training batch: :meth:`TrainerProbe.example_pass`
runs :func:`~gradlens.probe_batch` on one micro-batch (one more forward and
backward), and :meth:`pre_step` checks that the examples it saw make up the
gradient the trainer accumulated. Without it the per-example records
(``train_loss``, ``example_cosine_*``) are NaN.

Each record has the definition of :data:`~gradlens.training.STEP_RECORDS`;
``tests/integrations`` checks every one against :func:`~gradlens.training.probed_step`
on the same batches in float64.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.alignment.gradops import check_finite, cosine, safe_divide
from gradlens.alignment.layerstats import groups_for, layer_stats
from gradlens.errors import UnsupportedModelError
from gradlens.integrations.examples import ExampleValues
from gradlens.probes.batch import Inputs
from gradlens.probes.batch import forward as call_model
from gradlens.probes.ghost import probe_batch
from gradlens.probes.outputs import OutputSelector, plain_forward, select_output
from gradlens.probes.vmap import LossFn, Randomness, check_vmap_compatible, loss_and_grad
from gradlens.records.recorder import Recorder
from gradlens.training.body import StepResult
from gradlens.training.checks import check_objective
from gradlens.training.objective import Objective
from gradlens.training.records import (
    TransformLayout,
    step_coords,
    step_values,
    step_variables,
    transform_layout,
)
from gradlens.transforms.base import GradientTransform, needs_example_dots

__all__ = ["LOGGED", "TrainerProbe"]

LOGGED = ("cosine", "applied_cosine", "update_cosine", "projection", "trait_loss")
"""The scalar records handed to the trainer's own logging by default (mean since the last log)."""


class TrainerProbe:
    """The measurements, transform and records of a probed step inside another trainer.

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
        output: Which tensor of the model's output the losses see (``"logits"``
            for a Hugging Face model), as in :func:`~gradlens.probed_step`.
        path: The netCDF run file; ``None`` keeps the rows in memory
            (:attr:`recorder`, ``recorder.dataset()``).
        overwrite: Replace an existing run file.
        config: Stored in the run file's attrs (a dataclass or Mapping).
        flush_every: Rows between writes of the run file.
        measure_change: Also evaluate the trait loss after each step (one
            forward without grad): ``measured_change``.
        logged: The scalar records handed to the trainer's logging.

    Attributes:
        recorder: The run's :class:`~gradlens.Recorder` (after :meth:`start`).
        result: The last step's :class:`~gradlens.training.StepResult`, its
            records in the parameters' dtype.
        before_state: The transform's current state.
    """

    def __init__(
        self,
        trait: Objective,
        *,
        before: GradientTransform | None = None,
        before_state: Any = None,
        output: OutputSelector | None = None,
        path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        config: object | None = None,
        flush_every: int = 50,
        measure_change: bool = True,
        logged: tuple[str, ...] = LOGGED,
    ) -> None:
        check_objective("trait", trait)
        self.trait = trait
        self.before = before
        self.before_state = before_state
        self.output = output
        self.path = path
        self.overwrite = overwrite
        self.config = config
        self.flush_every = flush_every
        self.measure_change = measure_change
        self.logged = logged
        self.recorder: Recorder | None = None
        self.result: StepResult | None = None
        self.layout: TransformLayout | None = None
        self._params: dict[str, Tensor] = {}
        self._g_t: tuple[Tensor, dict[str, Tensor]] | None = None
        self._examples = ExampleValues()
        self._pending: dict[str, Tensor] | None = None
        self._step = 0
        self._example_cosine = torch.empty(0)
        self._examples_size: int | None = None
        self._old: dict[str, Tensor] = {}
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
                data-parallel run: every process measures the same all-reduced gradient).
        """
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no parameter that requires grad: the probe "
                "measures the gradient of the trained ones."
            )
        self._params = params
        device = next(iter(params.values())).device
        self.trait = _to(self.trait, device)
        if self.before is not None and self.before_state is None:
            self.before_state = self.before.init({n: p.detach() for n, p in params.items()})
        self.layout = transform_layout(params, before=self.before)
        if self.recorder is None and record:
            self.recorder = Recorder(
                self.path,
                step_variables(self.layout),
                coords=step_coords(list(groups_for(list(params), "layer")), self.layout),
                config=self.config,
                flush_every=self.flush_every,
                overwrite=self.overwrite,
            )

    def finish(self, *, complete: bool = True) -> None:
        """Close the run file (``complete=False`` for a run that stopped early)."""
        if self.recorder is not None and self.path is not None:
            self.recorder.close(complete=complete)

    # -- per micro-batch ---------------------------------------------------------

    def trait_gradient(self, model: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        """``(trait loss, g_t)`` at the current parameters, taken once per optimizer step."""
        if self._g_t is None:
            loss, g_t = loss_and_grad(
                model, self.trait.loss_fn, self.trait.inputs, *self.trait.targets,
                params=list(self._params), output=self.output,
            )  # fmt: skip
            self._g_t = (loss, {n: g.detach() for n, g in g_t.items()})
        return self._g_t

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
        found = probe_batch(
            model, loss_fn, inputs, *targets, reference=g_t,
            params=list(self._params), randomness=randomness, output=self.output,
        )  # fmt: skip
        self._examples.add(found)

    # -- around the optimizer step ---------------------------------------------------

    def pre_step(self, model: nn.Module, step: int, *, max_norm: float | None = None) -> None:
        """Measure the accumulated ``.grad`` against ``g_t``; apply ``before`` to it in place.

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
        """
        params = self._params
        missing = [n for n, p in params.items() if p.grad is None]
        if missing:
            raise UnsupportedModelError(
                f"parameters {missing[:4]} require grad but have no .grad at the optimizer "
                "step: they took no part in the training loss. Freeze them "
                "(requires_grad_(False)) before training."
            )
        trait_loss, g_t = self.trait_gradient(model)
        check_finite(g_t, step=step, what="trait gradient")
        g = {n: p.grad.detach() for n, p in params.items()}  # type: ignore[union-attr]
        check_finite(g, step=step, what="training gradient (.grad)")
        train = layer_stats(g, reference=g_t)
        trait_norm = train.ref_sq_norm.sum().sqrt()
        g_dot_t = train.dot.sum()
        train_cosine = safe_divide(g_dot_t, (train.sq_norm.sum() * train.ref_sq_norm.sum()).sqrt())
        records = {
            "trait_loss": trait_loss,
            "cosine": train_cosine,
            "trait_norm": trait_norm,
            "train_norm": train.sq_norm.sum().sqrt(),
            "projection": safe_divide(g_dot_t, trait_norm.square()),
            "layer_cosine": safe_divide(train.dot, (train.sq_norm * train.ref_sq_norm).sqrt()),
            "layer_trait_norm": train.ref_sq_norm.sqrt(),
            "layer_train_norm": train.sq_norm.sqrt(),
            "applied_cosine": train_cosine,
        }
        seen, self._examples = self._examples, ExampleValues()
        example_dots, example_cosine = None, torch.empty(0)
        if seen:
            seen.check(g, step, max_norm)
            more, example_dots, example_cosine = seen.records(trait_norm)
            records |= more
        self._old = {n: p.detach().clone() for n, p in params.items()}
        if self.before is not None:
            if needs_example_dots(self.before) and example_dots is None:
                raise TypeError(
                    "before= is a per-example transform (it needs example_dots): take the "
                    "per-example pass (ProbedTrainer for transformers, examples= for Lightning) "
                    "or use its global form (remove_aligned, scale_aligned)."
                )
            applied, self.before_state = self.before.update(
                g, self.before_state, self._old, reference=g_t, example_dots=example_dots
            )
            with torch.no_grad():
                for name, p in params.items():
                    p.grad.copy_(applied[name])  # type: ignore[union-attr]
            records["applied_cosine"] = cosine(applied, g_t)
        self._pending = records
        self._step = step
        self._example_cosine = example_cosine

    def post_step(self, model: nn.Module) -> dict[str, Tensor]:
        """The update's records after the optimizer stepped; log the row.

        Returns:
            The step's records, as :attr:`StepResult.records <gradlens.training.StepResult>`.
        """
        if self._pending is None:
            raise RuntimeError("post_step without pre_step: the probe saw no gradient this step.")
        records, self._pending = self._pending, None
        _, g_t = self.trait_gradient(model)
        with torch.no_grad():
            delta = {n: p.detach() - self._old[n] for n, p in self._params.items()}
            update = layer_stats(delta, reference=g_t)
            records["update_cosine"] = safe_divide(
                update.dot.sum(), (update.sq_norm.sum() * update.ref_sq_norm.sum()).sqrt()
            )
            records["predicted_change"] = update.dot.sum()
            if self.measure_change:
                with plain_forward(model):
                    out = select_output(call_model(model, self.trait.inputs), self.output)
                records["measured_change"] = (
                    self.trait.loss_fn(out, *self.trait.targets) - records["trait_loss"]
                )
        self._g_t, self._old = None, {}
        result = StepResult(records, self._example_cosine, self.before_state, None)
        self.result = result
        if self.recorder is not None:
            self.recorder.log(self._step, **step_values(result, self.layout))
            if self._example_cosine.numel():
                self.recorder.log(self._step, example_cosine=self._padded(self._example_cosine))
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


def _to(objective: Objective, device: torch.device) -> Objective:
    """The objective with its tensors on ``device``."""
    inputs = objective.inputs
    moved = (
        {k: v.to(device) for k, v in inputs.items()}
        if isinstance(inputs, Mapping)
        else inputs.to(device)
    )
    targets = tuple(t.to(device) for t in objective.targets)
    return Objective(objective.loss_fn, moved, targets, objective.parts)
