"""A transform state, chained or not, as named records: ``{transform: {field: value}}``.

Each leaf state (a NamedTuple such as :class:`~gradlens.transforms.ScaleAlignedState`)
is one transform. Its name is the one given to :func:`~gradlens.transforms.named_chain`
(joined with ``"."`` for nested named chains); a transform outside a named chain
is named after its state type (``ScaleAlignedState`` -> ``scale_aligned``), with
its position in a plain :func:`~gradlens.transforms.chain` appended when that name
repeats. Empty states (``identity``) add nothing, and integer fields (the random
``key`` and ``count`` of :func:`~gradlens.transforms.remove_random`) are state, not
measurements: they are left out (a float32 record would round a 63-bit key). How a
probed step lays these out
in a run file (``placement``, ``transform``, ``stage`` and ``group`` dims) is
:mod:`gradlens.training.records`.

Example:
    >>> import torch
    >>> from gradlens.transforms import identity, named_chain, remove_aligned
    >>> g = {"w": torch.tensor([1.0, 1.0])}
    >>> tx = named_chain(("keep", identity()), ("remove", remove_aligned()))
    >>> records = transform_records(tx.init(g))
    >>> list(records), sorted(records["remove"])
    (['remove'], ['acted', 'coef', 'cosine_after', 'cosine_before'])
    >>> list(transform_records(remove_aligned().init(g)))
    ['scale_aligned']
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import torch
from torch import Tensor

from gradlens.transforms.base import State

__all__ = ["state_name", "transform_records"]


def state_name(state_type: type) -> str:
    """``ScaleAlignedPerExampleState`` -> ``scale_aligned_per_example``."""
    name = state_type.__name__.removesuffix("State")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _is_leaf(state: State) -> bool:
    return isinstance(state, tuple) and hasattr(state, "_fields")


def _leaves(state: State, prefix: str) -> Iterator[tuple[str, tuple]]:
    """Yield ``(name, leaf)`` for the NamedTuple states of a (nested) chain state."""
    if _is_leaf(state):
        yield prefix or state_name(type(state)), state
    elif isinstance(state, dict):
        for key, inner in state.items():
            yield from _leaves(inner, f"{prefix}.{key}" if prefix else key)
    elif type(state) is tuple:
        named = [(n, leaf) for inner in state for n, leaf in _leaves(inner, "")]
        counts = Counter(n for n, _ in named)
        for index, (n, leaf) in enumerate(named):
            n = n if counts[n] == 1 else f"{n}_{index}"
            yield (f"{prefix}.{n}" if prefix else n), leaf
    else:
        raise TypeError(
            "a transform state is a NamedTuple, or a tuple or dict of states, got "
            f"{type(state).__name__}."
        )


def transform_records(state: State) -> dict[str, dict[str, Tensor]]:
    """Return every field of every transform in a state, detached, by transform name.

    Args:
        state: A transform's state, a chain's tuple or a named chain's dict of states.

    Returns:
        ``{transform: {field: value}}`` in run order, floating-point fields only;
        values keep the state's shapes (``()`` for ``scope="global"``,
        ``(layer,)`` for ``scope="layer"``).

    Raises:
        TypeError: If ``state`` is not a transform state.
    """
    records = {}
    for name, leaf in _leaves(state, ""):
        values = {field: torch.as_tensor(getattr(leaf, field)).detach() for field in leaf._fields}
        kept = {f: v for f, v in values.items() if v.is_floating_point()}
        if kept:
            records[name] = kept
    return records
