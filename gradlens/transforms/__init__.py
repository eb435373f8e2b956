"""Gradient interventions as composable pure transforms (optax style).

Every transform is a :class:`GradientTransform` ``(init, update)``; ``update``
takes the gradients (or an optimizer's step), the state, and a required
keyword ``reference``. See ``docs/interventions.md``.
"""

from __future__ import annotations

from gradlens.transforms.aligned import (
    ScaleAlignedState,
    remove_aligned,
    reverse_aligned,
    scale_aligned,
)
from gradlens.transforms.base import (
    GradientTransform,
    IdentityState,
    Scope,
    State,
    StateMismatchError,
    TransformInit,
    TransformUpdate,
    identity,
)
from gradlens.transforms.combining import chain, named_chain
from gradlens.transforms.conditional import (
    ConditionalState,
    conditionally_transform,
    steps_between,
)
from gradlens.transforms.per_example import (
    ScaleAlignedPerExampleState,
    remove_aligned_per_example,
    reverse_aligned_per_example,
    scale_aligned_per_example,
)
from gradlens.transforms.per_model import per_model
from gradlens.transforms.random_direction import RemoveRandomState, remove_random
from gradlens.transforms.records import transform_records

__all__ = [
    "ConditionalState",
    "GradientTransform",
    "IdentityState",
    "RemoveRandomState",
    "ScaleAlignedPerExampleState",
    "ScaleAlignedState",
    "Scope",
    "State",
    "StateMismatchError",
    "TransformInit",
    "TransformUpdate",
    "chain",
    "conditionally_transform",
    "identity",
    "named_chain",
    "per_model",
    "remove_aligned",
    "remove_aligned_per_example",
    "remove_random",
    "reverse_aligned",
    "reverse_aligned_per_example",
    "scale_aligned",
    "scale_aligned_per_example",
    "steps_between",
    "transform_records",
]
