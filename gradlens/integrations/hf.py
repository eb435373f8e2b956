"""gradlens in ``transformers.Trainer`` and trainers built on it (TRL's SFTTrainer, GKDTrainer).

:class:`GradlensCallback` is a ``TrainerCallback``. At ``on_pre_optimizer_step``
(after every micro-batch's backward, the all-reduce of data parallelism and
gradient clipping, so ``.grad`` is the gradient the optimizer applies) it takes
the trait gradient ``g_t`` without touching ``.grad``, records the alignment of
``.grad`` with it, globally and per layer, and applies the ``before`` transform
to ``.grad`` in place; at ``on_optimizer_step`` it applies the ``after``
transform to the update, records the update's alignment and logs the row to the
run file (:class:`~gradlens.integrations.TrainerProbe`).
At ``on_log`` it adds the means of the logged records since the last log to the
trainer's logs (``gradlens/cosine``, ...), so ``report_to`` sends them to
TensorBoard or W&B: :meth:`GradlensCallback.add_to` puts the callback before the
trainer's reporting callbacks, which it must be for them to see these values.

:class:`ProbedTrainerMixin` (and :class:`ProbedTrainer`) add the per-example
values: one more forward and backward of each micro-batch
(:func:`~gradlens.probe_batch`), in float32 or float64. For a loss normalised over the
whole step's tokens (GKDTrainer's), ``examples(batch, step)`` gets the step's
:class:`StepCounts`, and :func:`step_weights` weighs its examples.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from transformers import Trainer, TrainingArguments
    >>> from gradlens import Objective
    >>> from gradlens.integrations import TrainerProbe
    >>> trait = Objective(F.cross_entropy, torch.randn(8, 4), (torch.zeros(8).long(),))
    >>> callback = GradlensCallback(TrainerProbe(trait, output="logits"))
    >>> # Trainer(model=..., args=..., train_dataset=...), then callback.add_to(trainer)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradlens.integrations.probe import TrainerProbe
from gradlens.probes.vmap import Randomness
from gradlens.training.objective import Objective

__all__ = ["GradlensCallback", "ProbedTrainer", "ProbedTrainerMixin", "StepCounts", "step_weights"]


class StepCounts(NamedTuple):
    """The size of the whole optimizer step a micro-batch belongs to (this process's).

    Attributes:
        examples: The examples of all the step's micro-batches.
        items: The trainer's ``num_items_in_batch``: the valid labels of all the step's
            micro-batches (shifted for a causal LM), by which Hugging Face's losses and
            TRL's ``GKDTrainer`` divide their sums; ``None`` where the trainer counts none.
    """

    examples: int
    items: float | None


def step_weights(labels: Tensor, step: StepCounts, *, shift: bool = True) -> Tensor:
    """Each example's weight in a loss summed over the step's valid labels, over their count.

    ``w_i = n_i * step.examples / step.items`` for ``n_i`` valid labels of example ``i``:
    a loss ``mean_i(w_i * l_i)`` per micro-batch (``l_i`` the mean over example ``i``'s
    valid tokens), accumulated as the examples' mean over the step, is the sum of every
    token's loss over ``step.items``: the trainer's loss, whatever the examples' lengths.
    :func:`~gradlens.training.losses.token_weights` is this for a step of one micro-batch.

    Args:
        labels: ``(example, token)``, -100 where ignored.
        step: The step's counts (``items`` not ``None``).
        shift: The first label predicts nothing (a causal LM).

    Returns:
        ``(example,)``, float64 (float32 on MPS).

    Raises:
        ValueError: If the trainer counted no items.
    """
    if step.items is None:
        raise ValueError(
            "the trainer passed no num_items_in_batch (its model takes no loss kwargs and it "
            "has no compute_loss_func), so its loss is not normalised over the step's tokens: "
            "use examples(batch) without step weights."
        )
    if shift:
        labels = labels[:, 1:]
    dtype = torch.float32 if labels.device.type == "mps" else torch.float64
    count = (labels != -100).sum(dim=1).to(dtype)
    return count * step.examples / max(float(step.items), 1.0)


def _check_precision(args: TrainingArguments, *, examples: bool) -> None:
    """Refuse what the probe cannot measure exactly under the trainer's precision or layout."""
    if examples and args.world_size > 1:
        raise ValueError(
            f"the per-example pass of ProbedTrainer sees this process's micro-batches only, "
            f"but .grad is all-reduced over {args.world_size} processes, so its examples "
            "would not make up that gradient: use GradlensCallback alone under data "
            "parallelism (global and per-layer values), or gradlens.distributed_probed_step."
        )
    if args.fp16:
        raise ValueError(
            "TrainingArguments(fp16=True) trains with a GradScaler: at the pre-optimizer step "
            ".grad is still scaled unless max_grad_norm > 0 unscaled it, and it is not finite "
            "on the steps the scaler skips, so gradlens cannot measure it reliably. Use "
            "bf16=True (no scaler) or full precision."
        )
    if examples and (args.bf16 or args.fp16):
        raise ValueError(
            "the per-example pass of ProbedTrainer runs in the parameters' precision, not the "
            "trainer's bf16 autocast, so its examples would not make up the gradient the "
            "trainer applies: train in float32 or float64, or use GradlensCallback alone "
            "(global and per-layer values work under bf16)."
        )


def _examples(batch: Mapping[str, Any]) -> int:
    """The examples of a collated batch: the leading dim of its first tensor."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))


def _check_off_policy(trainer: Any) -> None:
    """Refuse a trainer that replaces the micro-batch after the per-example pass saw it."""
    if getattr(trainer, "lmbda", 0.0) > 0 or getattr(trainer, "seq_kd", False):
        raise ValueError(
            f"GKDTrainer(lmbda={trainer.lmbda}, seq_kd={trainer.seq_kd}) generates new "
            "completions inside its training_step, after ProbedTrainerMixin's per-example pass "
            "has seen the dataset's micro-batch, so its examples would not make up the "
            "gradient: pass lmbda=0 and seq_kd=False (off-policy), or use GradlensCallback "
            "alone (global and per-layer values work on-policy)."
        )


class GradlensCallback(TrainerCallback):
    """Probe every optimizer step of a ``transformers.Trainer``; see the module docstring.

    Args:
        probe: What to measure and record, and the transform to apply.
        prefix: Prefix of the scalars added to the trainer's logs.
    """

    def __init__(self, probe: TrainerProbe, *, prefix: str = "gradlens/") -> None:
        self.probe = probe
        self.prefix = prefix

    def add_to(self, trainer: Trainer) -> None:
        """Add the callback ahead of ``trainer``'s reporting callbacks (they log what it adds)."""
        trainer.callback_handler.callbacks.insert(0, self)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Check the precision and open the run file (on the main process)."""
        _check_precision(args, examples=False)
        assert model is not None
        self.probe.start(model, record=state.is_world_process_zero)

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Measure ``.grad`` and apply the transform to it."""
        assert model is not None
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        self.probe.pre_step(model, state.global_step, max_norm=clip)

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Measure the update and record the step."""
        assert model is not None
        self.probe.post_step(model, kwargs.get("optimizer"))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the records' means since the last log to the trainer's logs."""
        if logs is not None and "loss" in logs:  # a training log, not an evaluation's
            logs.update(self.probe.scalars(self.prefix))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Close the run file, marked complete."""
        self.probe.finish()


class ProbedTrainerMixin:
    """A ``Trainer`` mixin that adds the per-example values of each micro-batch.

    Put it first: ``class MySFT(ProbedTrainerMixin, SFTTrainer)``. Before the
    trainer's own forward and backward of a micro-batch it runs
    :meth:`TrainerProbe.example_pass`: one more forward and backward
    (:func:`~gradlens.probe_batch`, factored where a form applies), so a
    step costs about twice the trainer's, plus the trait gradient. At the
    optimizer step the examples' mean gradient must match ``.grad`` (else a
    :class:`~gradlens.errors.GradientMismatchError` names the cause).

    Args:
        *args: The trainer's arguments.
        gradlens: The callback (added ahead of the reporting callbacks).
        examples: ``examples(batch) -> Objective``: the micro-batch (a dict, on the
            model's device) as the model inputs, targets and the loss the trainer
            minimises, mean-reduced over examples (see :meth:`Objective.from_batch
            <gradlens.Objective.from_batch>`; a 2-D ``attention_mask`` may stay in,
            padded or not). ``examples(batch, step)``, with two
            parameters, also gets the step's :class:`StepCounts`, for a loss the trainer
            normalises over the whole accumulated step (:func:`step_weights`).
        randomness: As in :func:`~gradlens.probe_batch` (for dropout).
        **kwargs: The trainer's keyword arguments.
    """

    def __init__(
        self,
        *args: Any,
        gradlens: GradlensCallback,
        examples: Callable[..., Objective],
        randomness: Randomness = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.gradlens = gradlens
        self.gradlens_examples = examples
        self.gradlens_randomness: Randomness = randomness
        gradlens.add_to(self)  # type: ignore[arg-type]
        self.gradlens_step = len(inspect.signature(examples).parameters) > 1
        self.gradlens_step_examples = 0

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], Tensor | int | None]:
        """The trainer's micro-batches of one optimizer step; their examples counted."""
        found = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        self.gradlens_step_examples = sum(_examples(b) for b in found[0])
        return found

    def training_step(
        self,
        model: nn.Module,
        inputs: Mapping[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The per-example pass on the micro-batch, then the trainer's own step."""
        trainer: Any = self
        _check_precision(trainer.args, examples=True)
        _check_off_policy(trainer)
        batch = trainer._prepare_inputs(dict(inputs))
        if self.gradlens_step:
            items = None if num_items_in_batch is None else float(num_items_in_batch)
            objective = self.gradlens_examples(
                batch, StepCounts(self.gradlens_step_examples, items)
            )
        else:
            objective = self.gradlens_examples(batch)
        trainer.model.train()
        self.gradlens.probe.example_pass(
            trainer.model,
            objective.loss_fn,
            objective.inputs,
            *objective.targets,
            randomness=self.gradlens_randomness,
        )
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]


class ProbedTrainer(ProbedTrainerMixin, Trainer):
    """``transformers.Trainer`` with the per-example pass (:class:`ProbedTrainerMixin`)."""
