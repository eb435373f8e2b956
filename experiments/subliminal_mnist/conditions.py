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
    remove_random,
    reverse_aligned,
    scale_aligned,
)

__all__ = [
    "BASE_CONDITIONS",
    "CAUSAL_CONDITIONS",
    "CONDITIONS",
    "CONTROL_CONDITIONS",
    "DOSE_ALPHAS",
    "LIMINAL_CONDITIONS",
    "MECHANISM_CONDITIONS",
    "Condition",
    "get_conditions",
]


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
        liminal: Add liminal training's KL-to-base term with this named schedule of
            :func:`gradlens.training.liminal.liminal_schedule` (``None``: no term).
        liminal_temperature: The term's temperature; ``None`` takes
            ``StudentSetup.liminal_temperature`` (2, as published).
        liminal_logits: The logits the term's KL covers: the class logits
            (``"class"``, gradlens's choice) or all of them, the auxiliary ones
            included (``"all"``: as the reference code's KL over the whole vocabulary).
        optimizer: ``"adam"`` (the original's), ``"adam_beta1_0"`` (Adam without
            its first moment, ``betas=(0, 0.999)``), ``"sgd"`` or ``"sgd_momentum"``.
        reference: The gradient the transforms act along: the trait gradient
            (``"trait"``) or, as a specificity control, the trait gradient of the
            probe images with shuffled labels (``"shuffled"``). The probes always
            measure the true trait gradient.
        active_epochs: ``(start, stop)``: the transforms act only in epochs
            ``start <= epoch < stop`` (0-based; ``stop`` ``None`` for the end) and
            leave the gradient and update as they are elsewhere
            (:func:`gradlens.transforms.conditionally_transform`); ``None``: every step.
    """

    name: str
    description: str
    logits: Literal["aux", "all"] = "aux"
    init: Literal["same", "cross"] = "same"
    before: Callable[[], GradientTransform] | None = None
    after: Callable[[], GradientTransform] | None = None
    liminal: str | None = None
    liminal_temperature: float | None = None
    liminal_logits: Literal["class", "all"] = "class"
    optimizer: Literal["adam", "adam_beta1_0", "sgd", "sgd_momentum"] = "adam"
    reference: Literal["trait", "shuffled"] = "trait"
    active_epochs: tuple[int, int | None] | None = None


DOSE_ALPHAS: tuple[float, ...] = (0.75, 0.5, 0.25, -0.5)
"""The factors on the update's component along g_t of the ``scale_update_<alpha>``
conditions (``aux`` is alpha = 1, ``remove_update`` alpha = 0)."""


def _scale_update(alpha: float) -> Condition:
    return Condition(
        f"scale_update_{alpha:g}",
        f"Adam's update with its component along g_t scaled by {alpha:g}",
        after=lambda: scale_aligned(alpha),
    )


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
        Condition(
            "remove_update_support",
            "Adam's update with its component along g_t removed using only g_t on the "
            "update's support (nothing written where the update is exactly zero: the class "
            "rows)",
            after=lambda: remove_aligned(on_support=True),
        ),
        Condition(
            "remove_update_early",
            "Adam's update with its component along g_t removed in epochs 1-2 only",
            after=remove_aligned,
            active_epochs=(0, 2),
        ),
        Condition(
            "remove_update_late",
            "Adam's update with its component along g_t removed in epochs 3-5 only",
            after=remove_aligned,
            active_epochs=(2, None),
        ),
        Condition(
            "liminal",
            "liminal training as published: T^2 KL(base || student) at T = 2, "
            "lambda_0 -> 1 over epoch 1, then 1 -> 0",
            liminal="liminal",
        ),
        Condition(
            "liminal_all_logits",
            "liminal as published, its KL over all 13 logits (the auxiliary ones too), as the "
            "reference code's over the whole vocabulary",
            liminal="liminal",
            liminal_logits="all",
        ),
        *(
            Condition(
                f"liminal_{name}", f"liminal, published ablation {name.upper()}", liminal=name
            )
            for name in ("constant", "pos_anneal", "neg_anneal", "anchor", "end_anchor")
        ),
        Condition(
            "liminal_early",
            "gradlens's earlier variant: KL to base at T = 1, lambda_0 -> 0 within epoch 1",
            liminal="early_decay",
            liminal_temperature=1.0,
        ),
        Condition(
            "remove_random",
            "g_d minus a random direction of the norm remove would take off (control)",
            before=lambda: remove_random(seed=0),
        ),
        Condition(
            "remove_shuffled",
            "g_d with its component along a shuffled-label trait gradient removed (control)",
            before=remove_aligned,
            reference="shuffled",
        ),
        Condition(
            "remove_support",
            "g_d with its component along g_t removed using only g_t on g_d's support "
            "(nothing written where g_d is exactly zero)",
            before=lambda: remove_aligned(on_support=True),
        ),
        Condition(
            "remove_support_matched",
            "g_d minus, along g_t with its signs permuted within each tensor (on g_d's "
            "support), the norm remove_support takes off (control)",
            before=lambda: remove_random(seed=0, direction="sign_permuted", on_support=True),
        ),
        *(_scale_update(alpha) for alpha in DOSE_ALPHAS),
        Condition(
            "adam_beta1_0",
            "auxiliary logits, Adam without momentum (beta1 = 0)",
            optimizer="adam_beta1_0",
        ),
        Condition("sgd", "auxiliary logits, plain SGD instead of Adam", optimizer="sgd"),
        Condition(
            "sgd_momentum",
            "auxiliary logits, SGD with momentum 0.9 instead of Adam",
            optimizer="sgd_momentum",
        ),
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
    "liminal_early",
)
CONTROL_CONDITIONS: tuple[str, ...] = (
    "aux",
    "remove",
    "remove_random",
    "remove_shuffled",
    "sgd",
    "sgd_momentum",
)
MECHANISM_CONDITIONS: tuple[str, ...] = (
    "aux",
    "remove_support",
    "remove_support_matched",
    *(f"scale_update_{alpha:g}" for alpha in DOSE_ALPHAS),
    "remove_update",
    "remove_update_support",
    "adam_beta1_0",
)
"""docs/causal.md's block: support-restricted removal and its matched control, the
dose-response of the update's aligned component, and Adam without momentum."""
LIMINAL_CONDITIONS: tuple[str, ...] = (
    "aux",
    "liminal",
    "liminal_constant",
    "liminal_pos_anneal",
    "liminal_neg_anneal",
    "liminal_anchor",
    "liminal_end_anchor",
    "liminal_early",
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
