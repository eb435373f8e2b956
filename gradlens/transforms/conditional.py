"""Apply a transform only at some updates: :func:`conditionally_transform` (optax's name).

``conditionally_transform(inner, should_transform)`` counts the updates it is
given (0 at the first) and, at update ``step``, returns ``inner``'s output where
``should_transform(step)`` is true and the incoming gradients unchanged where
it is false; ``inner``'s state advances only at the updates it acts on (as in
optax's ``conditionally_transform``). The choice is a ``torch.where`` on the
count, not Python control flow, so the wrapper runs under
:func:`~gradlens.transforms.per_model`'s ``vmap`` too; ``inner`` is therefore
evaluated at every update and its result discarded where it does not act.

The state is the tuple ``(ConditionalState(step, active), inner_state)``:
``step`` (int64, the updates made so far; state, not a record) and
``active`` (1.0 where ``inner`` acted at the last update, else 0.0). Its
records (:func:`~gradlens.transforms.transform_records`) are ``conditional``'s
``active`` beside ``inner``'s own, which are those of the last update ``inner``
acted on (its ``init`` values before the first).

Example:
    >>> import torch
    >>> from gradlens.transforms import remove_aligned
    >>> tx = conditionally_transform(remove_aligned(), lambda step: step >= 1)
    >>> g, r = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.0, 0.0])}
    >>> state = tx.init(g)
    >>> out, state = tx.update(g, state, reference=r)  # update 0: left as it is
    >>> out["w"], float(state[0].active)
    (tensor([1., 1.]), 0.0)
    >>> out, state = tx.update(g, state, reference=r)  # update 1: removed
    >>> out["w"], float(state[0].active)
    (tensor([0., 1.]), 1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from gradlens.transforms.base import (
    GradientTransform,
    State,
    StateMismatchError,
    mark_needs_example_dots,
    needs_example_dots,
)

__all__ = ["ConditionalState", "conditionally_transform", "steps_between"]


class ConditionalState(NamedTuple):
    """The counter of :func:`conditionally_transform`.

    Attributes:
        step: Updates made so far, int64 ``()`` (state, not a record).
        active: 1.0 where the inner transform acted at the last update, else 0.0,
            in the parameters' dtype, ``()``.
    """

    step: Tensor
    active: Tensor


def steps_between(start: int, stop: int | None = None) -> Callable[[Tensor], Tensor]:
    """A ``should_transform`` that is true for updates ``start <= step < stop``.

    Args:
        start: The first update acted on (0 is the first update).
        stop: One past the last; ``None`` for no end.

    Returns:
        ``f(step) -> bool tensor``, written with tensor ops (it runs under ``vmap``).

    Raises:
        ValueError: If ``start`` is negative or ``stop`` is not above ``start``.
    """
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(
            f"steps_between needs 0 <= start < stop, got start={start}, stop={stop}; "
            "updates are counted from 0."
        )

    def should_transform(step: Tensor) -> Tensor:
        active = step >= start
        return active if stop is None else active & (step < stop)

    return should_transform


def _select(active: Tensor, new: State, old: State) -> State:
    """``new`` where ``active``, else ``old``, leaf by leaf (same structure)."""
    new_leaves, spec = pytree.tree_flatten(new)
    old_leaves, old_spec = pytree.tree_flatten(old)
    if spec != old_spec:
        raise StateMismatchError(
            "conditionally_transform: the inner transform's update returned a state of "
            "another structure than it was given; an inner transform must keep its "
            "state's structure."
        )
    chosen = [
        torch.where(active, n, o) if isinstance(n, Tensor) else n
        for n, o in zip(new_leaves, old_leaves, strict=True)
    ]
    return pytree.tree_unflatten(chosen, spec)


def conditionally_transform(
    inner: GradientTransform, should_transform: Callable[[Tensor], Tensor | bool]
) -> GradientTransform:
    """Return ``inner`` applied only at the updates where ``should_transform(step)`` holds.

    Args:
        inner: Any transform.
        should_transform: ``f(step)`` of the int64 ``()`` update count (0 at the first
            update), a bool tensor or bool; write it with tensor ops
            (``lambda step: step < 100``, :func:`steps_between`) so that it runs
            under ``vmap``.

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` whose state is
        ``(ConditionalState, inner_state)``.

    Raises:
        TypeError: If ``inner`` is not a transform or ``should_transform`` not callable.
    """
    if not isinstance(inner, GradientTransform):
        raise TypeError(
            f"conditionally_transform wraps a GradientTransform, got {type(inner).__name__}; "
            "pass what a factory returns, e.g. remove_aligned()."
        )
    if not callable(should_transform):
        raise TypeError(
            "conditionally_transform's should_transform must be a function of the update "
            f"count, such as steps_between(0, 100), got {type(should_transform).__name__}."
        )

    def init(params: Mapping[str, Tensor]) -> tuple[ConditionalState, State]:
        first = next(iter(params.values()), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else None
        device = None if first is None else first.device
        counter = ConditionalState(
            torch.zeros((), dtype=torch.int64, device=device),
            torch.zeros((), dtype=dtype or torch.get_default_dtype(), device=device),
        )
        return counter, inner.init(params)

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], tuple[ConditionalState, State]]:
        if not (type(state) is tuple and len(state) == 2 and type(state[0]) is ConditionalState):
            raise StateMismatchError(
                "conditionally_transform(...).update expected a (ConditionalState, inner "
                f"state) tuple, got a {type(state).__name__}. Pass the state returned by "
                "this transform's init or by its previous update."
            )
        counter, inner_state = state
        active = torch.as_tensor(should_transform(counter.step), device=counter.step.device)
        active = active.to(torch.bool)
        out, new_inner = inner.update(grads, inner_state, params, reference=reference, **extra)
        chosen = {name: torch.where(active, out[name], g) for name, g in grads.items()}
        new_counter = ConditionalState(counter.step + 1, active.to(counter.active.dtype))
        return chosen, (new_counter, _select(active, new_inner, inner_state))

    mark_needs_example_dots(update, needs_example_dots(inner))
    return GradientTransform(init, update)
