"""The step body's mode inside a trainer's process: one model, ``g_t`` kept for the step.

:class:`TrainerMode` is :class:`~gradlens.training.step.SingleMode` (the mode of
:func:`~gradlens.probed_step`) whose trait gradient is taken once per optimizer step:
every micro-batch's per-example pass (:meth:`~gradlens.integrations.TrainerProbe.example_pass`)
and the step body's first half use the same ``g_t``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gradlens.probes.outputs import OutputSelector
from gradlens.training.objective import Objective
from gradlens.training.step import SingleMode

__all__ = ["TrainerMode", "to_device"]


class TrainerMode(SingleMode):
    """The model a trainer trains, one process: the trait gradient kept for the whole step.

    ``g_t`` is taken once per optimizer step (at the first example pass, or at
    :meth:`~gradlens.integrations.TrainerProbe.pre_step`) and used by every
    micro-batch's pass and by the step body.
    """

    def __init__(self, model: nn.Module, trait: Objective, output: OutputSelector | None) -> None:
        super().__init__(model, output=output)
        self.trait = trait
        self.g_t: tuple[Tensor, dict[str, Tensor]] | None = None

    def gradient(self, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective's loss and gradient; the trait's once per step."""
        if objective is not self.trait:
            return super().gradient(objective)
        if self.g_t is None:
            loss, g_t = super().gradient(objective)
            self.g_t = (loss.detach(), {n: g.detach() for n, g in g_t.items()})
        return self.g_t


def to_device(objective: Objective, device: torch.device) -> Objective:
    """The objective with its tensors on ``device``."""
    inputs = objective.inputs
    moved = (
        {k: v.to(device) for k, v in inputs.items()}
        if isinstance(inputs, Mapping)
        else inputs.to(device)
    )
    targets = tuple(t.to(device) for t in objective.targets)
    return Objective(objective.loss_fn, moved, targets, objective.parts)
