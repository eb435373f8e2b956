"""gradlens in Lightning: a ``Callback`` that probes every optimizer step.

At ``on_before_optimizer_step`` (after the backward of every accumulated
micro-batch and the all-reduce of data parallelism, after the AMP scaler's
unscale, *before* Lightning clips the gradient) :class:`GradlensCallback`
takes the trait gradient ``g_t`` without touching ``.grad``, records the
alignment of ``.grad`` with it, globally and per layer, and applies the
``before`` transform to ``.grad`` in place (Lightning then clips the result);
at the next ``on_train_batch_end`` it applies the ``after`` transform to the
update, records the update's alignment, logs the
row to the run file (:class:`~gradlens.integrations.TrainerProbe`) and logs
the scalars with ``pl_module.log_dict`` (so every Lightning logger shows them;
tensors, no host sync for the logging).

With ``examples=`` it also runs the per-example pass on each micro-batch at
``on_train_batch_start`` (one more forward and backward,
:func:`~gradlens.probe_batch`): ``examples(batch)`` returns the
:class:`~gradlens.Objective` of the micro-batch, whose loss must be the one
``training_step`` minimises, mean-reduced over examples.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from gradlens import Objective
    >>> from gradlens.integrations import TrainerProbe
    >>> trait = Objective(F.cross_entropy, torch.randn(8, 4), (torch.zeros(8).long(),))
    >>> per_batch = lambda batch: Objective(F.cross_entropy, batch[0], (batch[1],))
    >>> callback = GradlensCallback(TrainerProbe(trait), examples=per_batch)
    >>> # Trainer(callbacks=[callback]).fit(module, loader)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer

from gradlens.integrations.probe import TrainerProbe
from gradlens.probes.vmap import Randomness
from gradlens.training.objective import Objective

__all__ = ["GradlensCallback"]


class GradlensCallback(pl.Callback):
    """Probe every optimizer step of a Lightning ``Trainer``; see the module docstring.

    Args:
        probe: What to measure and record, and the transform to apply.
        examples: ``examples(batch) -> Objective`` of a training micro-batch, for
            the per-example values; ``None`` records the global and per-layer ones.
        randomness: As in :func:`~gradlens.probe_batch` (for dropout).
        prefix: Prefix of the logged scalars.
    """

    def __init__(
        self,
        probe: TrainerProbe,
        *,
        examples: Callable[[Any], Objective] | None = None,
        randomness: Randomness = "error",
        prefix: str = "gradlens/",
    ) -> None:
        self.probe = probe
        self.examples = examples
        self.randomness: Randomness = randomness
        self.prefix = prefix
        self._optimizer: Optimizer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the precision and open the run file (on global rank 0)."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"Trainer(precision={trainer.precision!r}) trains with a GradScaler, which "
                "skips the steps whose gradient is not finite, so gradlens cannot measure "
                "every step reliably. Use precision='bf16-mixed' (no scaler) or full precision."
            )
        if self.examples is not None and trainer.world_size > 1:
            raise ValueError(
                f"the per-example pass (examples=) sees this process's micro-batches only, but "
                f".grad is all-reduced over {trainer.world_size} processes, so its examples "
                "would not make up that gradient: leave examples= out under data parallelism "
                "(global and per-layer values), or use gradlens.distributed_probed_step."
            )
        if self.examples is not None and trainer.precision not in ("32-true", "64-true"):
            raise ValueError(
                f"the per-example pass (examples=) runs in the parameters' precision, not "
                f"Trainer(precision={trainer.precision!r}), so its examples would not make up "
                "the gradient Lightning applies: use precision '32-true' or '64-true', or "
                "leave examples= out (global and per-layer values work under bf16-mixed)."
            )
        self.probe.start(pl_module, record=trainer.is_global_zero)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The per-example pass on the micro-batch, with ``examples=``."""
        if self.examples is None:
            return
        objective = self.examples(batch)
        self.probe.example_pass(
            pl_module,
            objective.loss_fn,
            objective.inputs,
            *objective.targets,
            randomness=self.randomness,
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Measure ``.grad`` and apply the transform to it."""
        self._optimizer = optimizer
        self.probe.pre_step(pl_module, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After an optimizer step: measure the update, record and log the step."""
        if not self.probe.stepping:
            return
        records = self.probe.post_step(pl_module, self._optimizer)
        logged = {f"{self.prefix}{n}": records[n] for n in self.probe.logged if n in records}
        pl_module.log_dict(logged, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the run file, marked complete."""
        self.probe.finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the run file, marked incomplete."""
        self.probe.finish(complete=False)
