"""Named experimental conditions: what the student distils and how it is steered.

Every condition is data, not code: the training step
(:func:`gradlens.training.probed_step`) is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from gradlens.transforms import (
    GradientTransform,
    remove_aligned,
    remove_aligned_per_example,
    reverse_aligned,
)

__all__ = ["CONDITIONS", "Condition", "get_conditions"]


@dataclass(frozen=True)
class Condition:
    """One way of training the student.

    Attributes:
        name: Short name, used as the ``condition`` coordinate.
        description: One line for tables and legends.
        logits: Distil the auxiliary logits only (``"aux"``) or all of them (``"all"``).
        init: Start from the teacher's initialisation (``"same"``) or another seed's
            (``"cross"``).
        before: Factory of the transform applied to the distillation gradient.
        after: Factory of the transform applied to the optimizer's update.
        liminal: Add liminal training's KL-to-base term with the configured schedule.
    """

    name: str
    description: str
    logits: Literal["aux", "all"] = "aux"
    init: Literal["same", "cross"] = "same"
    before: Callable[[], GradientTransform] | None = None
    after: Callable[[], GradientTransform] | None = None
    liminal: bool = False


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("aux", "auxiliary logits, shared init"),
        Condition("all_logits", "all logits, shared init", logits="all"),
        Condition("cross_init", "auxiliary logits, another seed's init", init="cross"),
        Condition("remove", "g_d with its component along g_t removed", before=remove_aligned),
        Condition("reverse", "g_d with its component along g_t reversed", before=reverse_aligned),
        Condition(
            "remove_layer",
            "g_d with its component along g_t removed per layer",
            before=lambda: remove_aligned(scope="layer"),
        ),
        Condition(
            "remove_per_example",
            "each example's positive component along g_t removed",
            before=lambda: remove_aligned_per_example(only_positive=True),
        ),
        Condition(
            "remove_update",
            "Adam's update with its component along g_t removed",
            after=remove_aligned,
        ),
        Condition("liminal", "liminal training (KL to base, decaying)", liminal=True),
    )
}

BASE_CONDITIONS: tuple[str, ...] = ("aux", "all_logits", "cross_init")
CAUSAL_CONDITIONS: tuple[str, ...] = (
    "aux",
    "cross_init",
    "remove",
    "reverse",
    "remove_layer",
    "remove_per_example",
    "remove_update",
    "liminal",
)


def get_conditions(names: Iterable[str]) -> list[Condition]:
    """Look conditions up by name.

    Raises:
        ValueError: Naming the unknown names and listing the known ones.
    """
    names = list(names)
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown conditions {unknown}; choose from {sorted(CONDITIONS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"conditions are listed twice: {names}.")
    return [CONDITIONS[n] for n in names]
