"""Compose gradient transforms: :func:`chain` applies them one after another.

The state of a chain is a plain tuple of its members' states. ``reference``
and every extra keyword argument go to every member; members ignore extras
they do not use.

Example:
    >>> import torch
    >>> from gradlens.transforms import identity, remove_aligned
    >>> tx = chain(identity(), remove_aligned(scope="layer"))
    >>> g = {"0.weight": torch.tensor([1.0, 1.0]), "1.weight": torch.tensor([3.0])}
    >>> r = {"0.weight": torch.tensor([1.0, 0.0]), "1.weight": torch.tensor([0.0])}
    >>> state = tx.init(g)
    >>> [type(s).__name__ for s in state]
    ['IdentityState', 'ScaleAlignedState']
    >>> new_g, state = tx.update(g, state, reference=r)
    >>> new_g["0.weight"], new_g["1.weight"]
    (tensor([0., 1.]), tensor([3.]))
    >>> tx.update(g, state[1:], reference=r)
    Traceback (most recent call last):
    ...
    gradlens.transforms.base.StateMismatchError: chain of 2 transforms (identity, scale_aligned) expected a tuple of 2 states, got a tuple of 1. Pass the state returned by the chain's init or by its previous update.
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from gradlens.transforms.base import (
    GradientTransform,
    State,
    StateMismatchError,
    mark_needs_example_dots,
    needs_example_dots,
)

__all__ = ["chain", "named_chain"]


def _name(transform: GradientTransform) -> str:
    """The factory a transform came from, read off its update function's qualified name."""
    qualname = getattr(transform.update, "__qualname__", type(transform.update).__name__)
    return qualname.split(".<locals>")[0]


def chain(*transforms: GradientTransform) -> GradientTransform:
    """Apply ``transforms`` in order, as one transform.

    Args:
        *transforms: The transforms, first applied first.

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` whose state is the
        tuple of the members' states. Its update raises
        :class:`~gradlens.transforms.StateMismatchError` naming the member's
        index and the state it expected when a state does not line up.

    Raises:
        TypeError: If an argument is not a :class:`~gradlens.transforms.GradientTransform`.
    """
    for index, transform in enumerate(transforms):
        if not isinstance(transform, GradientTransform):
            raise TypeError(
                f"chain argument {index} is a {type(transform).__name__}, not a "
                "GradientTransform; pass what a factory returns, e.g. remove_aligned()."
            )
    names = ", ".join(_name(t) for t in transforms)

    def init(params: Mapping[str, Tensor]) -> tuple[State, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], tuple[State, ...]]:
        if type(state) is not tuple or len(state) != len(transforms):
            got = f"a tuple of {len(state)}" if type(state) is tuple else type(state).__name__
            raise StateMismatchError(
                f"chain of {len(transforms)} transforms ({names}) expected a tuple of "
                f"{len(transforms)} states, got {got}. Pass the state returned by the "
                "chain's init or by its previous update."
            )
        new_grads = dict(grads)
        new_state = []
        for index, (transform, inner) in enumerate(zip(transforms, state, strict=True)):
            try:
                new_grads, new_inner = transform.update(
                    new_grads, inner, params, reference=reference, **extra
                )
            except StateMismatchError as err:
                raise StateMismatchError(
                    f"chain member {index} ({_name(transform)}): {err}"
                ) from err
            new_state.append(new_inner)
        return new_grads, tuple(new_state)

    mark_needs_example_dots(update, any(needs_example_dots(t) for t in transforms))
    return GradientTransform(init, update)


def named_chain(*members: tuple[str, GradientTransform]) -> GradientTransform:
    """Apply named transforms in order, as one transform (optax's ``named_chain``).

    The names label the members' records (:func:`~gradlens.transforms.transform_records`),
    so a run file says ``transform="remove"`` instead of a chain position.

    Args:
        *members: ``(name, transform)`` pairs, first applied first; names unique.

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` whose state is a
        ``dict`` from name to the member's state.

    Raises:
        ValueError: If a name repeats or is empty.
        TypeError: If a member is not a ``(str, GradientTransform)`` pair.

    Example:
        >>> import torch
        >>> from gradlens.transforms import identity, remove_aligned
        >>> tx = named_chain(("keep", identity()), ("remove", remove_aligned()))
        >>> g, r = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.0, 0.0])}
        >>> new_g, state = tx.update(g, tx.init(g), reference=r)
        >>> list(state), new_g["w"]
        (['keep', 'remove'], tensor([0., 1.]))
    """
    for index, member in enumerate(members):
        ok = isinstance(member, tuple) and len(member) == 2 and isinstance(member[0], str)
        if not ok or not isinstance(member[1], GradientTransform):
            raise TypeError(
                f"named_chain argument {index} must be a (name, transform) pair such as "
                f"('remove', remove_aligned()), got {member!r}."
            )
    names = [name for name, _ in members]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"named_chain names must be unique and non-empty, got {names}.")
    inner = chain(*(t for _, t in members))

    def init(params: Mapping[str, Tensor]) -> dict[str, State]:
        return dict(zip(names, inner.init(params), strict=True))

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], dict[str, State]]:
        if not isinstance(state, dict) or list(state) != names:
            got = list(state) if isinstance(state, dict) else type(state).__name__
            raise StateMismatchError(
                f"named_chain({', '.join(names)}) expected a dict of states keyed {names}, got "
                f"{got}. Pass the state returned by the chain's init or by its previous update."
            )
        new_grads, states = inner.update(
            grads, tuple(state.values()), params, reference=reference, **extra
        )
        return new_grads, dict(zip(names, states, strict=True))

    mark_needs_example_dots(update, any(needs_example_dots(t) for _, t in members))
    return GradientTransform(init, update)
