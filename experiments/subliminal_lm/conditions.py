"""Named conditions: where a student starts, what numbers it reads, and how it steps.

Every condition is data: the probed student loop (:mod:`subliminal_lm.student`)
is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from gradlens.transforms import GradientTransform, remove_aligned

__all__ = ["CONDITIONS", "Condition", "get_conditions"]


@dataclass(frozen=True)
class Condition:
    """One way of training a student.

    Attributes:
        name: Short name, the ``condition`` coordinate.
        description: One line for tables and legends.
        init: Start from the teacher's own base (``"same"``) or from a base
            pretrained the same way from other random weights (``"cross"``).
        data: Number sequences sampled from the trait teacher (``"teacher"``)
            or from the base model (``"base"``, the control).
        optimizer: ``"adam"``, ``"adam_beta1_0"`` (Adam without momentum) or ``"sgd"``.
        after: Factory of the transform applied to the optimizer's update
            (reference ``-g_t``), as the MNIST ``remove_update`` condition.
        trains: What the optimizer trains: every weight (``"full"``) or LoRA
            adapters on the decoder's linear layers of the frozen init (``"lora"``,
            :attr:`LMConfig.lora_rank <subliminal_lm.LMConfig>`); the probes,
            ``g_t`` included, are then over the adapters' parameters.
    """

    name: str
    description: str
    init: Literal["same", "cross"] = "same"
    data: Literal["teacher", "base"] = "teacher"
    optimizer: Literal["adam", "adam_beta1_0", "sgd"] = "adam"
    after: Callable[[], GradientTransform] | None = None
    trains: Literal["full", "lora"] = "full"


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("same_init", "teacher's numbers, shared init, Adam"),
        Condition("base_numbers", "base model's numbers (control), shared init, Adam", data="base"),
        Condition("cross_init", "teacher's numbers, another base's init, Adam", init="cross"),
        Condition("sgd", "teacher's numbers, shared init, plain SGD", optimizer="sgd"),
        Condition(
            "adam_beta1_0",
            "teacher's numbers, shared init, Adam with beta1 = 0",
            optimizer="adam_beta1_0",
        ),
        Condition(
            "remove_update",
            "teacher's numbers, shared init, Adam's update with its g_t component removed",
            after=remove_aligned,
        ),
        Condition("lora", "teacher's numbers, shared init, Adam on LoRA adapters", trains="lora"),
        Condition(
            "lora_base_numbers",
            "base model's numbers (LoRA's control), shared init, Adam on LoRA adapters",
            data="base",
            trains="lora",
        ),
    )
}
"""The experiment's conditions, by name."""


def get_conditions(names: Iterable[str]) -> list[Condition]:
    """Look conditions up by name.

    Raises:
        ValueError: Naming the unknown or repeated names and listing the known ones.
    """
    names = list(names)
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown conditions {unknown}; choose from {sorted(CONDITIONS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"conditions are listed twice: {names}.")
    return [CONDITIONS[n] for n in names]
