"""Flatten a transform state, chained or not, into named tensors for a recorder.

A chain's state is a tuple of states, possibly nested; its leaves, in the
order the transforms run, are numbered ``t0, t1, ...``. Each field of leaf
``k`` becomes the record ``f"t{k}_{factory}_{field}"``, where ``factory`` is
the snake_case name of the state type without ``State``
(``ScaleAlignedState`` -> ``scale_aligned``). Empty states add nothing.

Example:
    >>> import torch
    >>> from gradlens.transforms import chain, identity, remove_aligned, reverse_aligned
    >>> g = {"w": torch.tensor([1.0, 1.0])}
    >>> tx = chain(remove_aligned(), identity(), chain(reverse_aligned()))
    >>> sorted(transform_records(tx.init(g)))[:3]
    ['t0_scale_aligned_acted', 't0_scale_aligned_coef', 't0_scale_aligned_cosine_after']
    >>> "t2_scale_aligned_coef" in transform_records(tx.init(g))
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import Tensor

from gradlens.transforms.base import State

__all__ = ["transform_records"]


def _leaves(state: State) -> Iterator[tuple]:
    """Yield the NamedTuple states of a (nested) chain state, in order."""
    if type(state) is tuple:
        for inner in state:
            yield from _leaves(inner)
    elif isinstance(state, tuple) and hasattr(state, "_fields"):
        yield state
    else:
        raise TypeError(
            f"a transform state is a NamedTuple or a tuple of states, got {type(state).__name__}."
        )


def _factory(state_type: type) -> str:
    """``ScaleAlignedPerExampleState`` -> ``scale_aligned_per_example``."""
    name = state_type.__name__.removesuffix("State")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def transform_records(state: State) -> dict[str, Tensor]:
    """Return every field of a transform state as a detached tensor under a unique name.

    Args:
        state: A transform's state, or a chain's (nested) tuple of states.

    Returns:
        ``{"t{k}_{factory}_{field}": value}`` over the leaves ``k`` in run
        order; values keep the state's shapes (``()`` or ``(layer,)``).

    Raises:
        TypeError: If ``state`` is neither a NamedTuple nor a tuple of states.
    """
    records = {}
    for index, leaf in enumerate(_leaves(state)):
        prefix = f"t{index}_{_factory(type(leaf))}"
        for field in leaf._fields:
            records[f"{prefix}_{field}"] = torch.as_tensor(getattr(leaf, field)).detach()
    return records
