"""The gradient-transform interface: a pair of pure functions, as in optax.

A :class:`GradientTransform` is ``(init, update)``. ``init(params)`` builds the
transform's state from the parameters (only their names, dtypes and device
matter); ``update(grads, state, params=None, *, reference, **extra)`` returns
the transformed gradients and the new state. Nothing is kept between calls
except what the caller passes back in, so a transform can be applied to raw
gradients before the optimizer or to the optimizer's step after it alike.

``reference`` (the gradient ``r`` that interventions act along) is keyword-only
and required, so forgetting it raises ``TypeError`` instead of silently doing
nothing. Transforms ignore ``**extra`` arguments they do not use, which lets
:func:`~gradlens.transforms.chain` pass every extra to every member.

Example:
    >>> import torch
    >>> tx = identity()
    >>> g = {"w": torch.tensor([1.0, 2.0])}
    >>> state = tx.init(g)
    >>> new_g, state = tx.update(g, state, reference=g, unused_extra=3)
    >>> new_g["w"]
    tensor([1., 2.])
    >>> tx.update(g, state)
    Traceback (most recent call last):
    ...
    TypeError: identity.<locals>.update() missing 1 required keyword-only argument: 'reference'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol, TypeAlias, Union

from torch import Tensor

from gradlens.alignment.layerstats import Scope
from gradlens.errors import GradlensError

__all__ = [
    "GradientTransform",
    "IdentityState",
    "Scope",
    "State",
    "StateMismatchError",
    "TransformInit",
    "TransformUpdate",
    "check_state",
    "identity",
    "mark_needs_example_dots",
    "needs_example_dots",
]


State: TypeAlias = Union[tuple[object, ...], Mapping[str, "State"]]  # noqa: UP007
"""A transform's state: a small NamedTuple of tensors (a tuple), a tuple of
states for :func:`~gradlens.transforms.chain`, or a dict of states by member
name for :func:`~gradlens.transforms.named_chain`."""


class TransformInit(Protocol):
    """``init(params) -> state``: only the parameters' names, shapes, dtypes and device matter."""

    def __call__(self, params: Mapping[str, Tensor], /) -> State:
        """Build the transform's first state."""
        ...


class TransformUpdate(Protocol):
    """``update(grads, state, params=None, *, reference, **extra) -> (grads, state)``.

    ``reference`` is keyword-only and required; extras a transform does not
    use (``example_dots``, for one) are ignored, so a chain passes every extra
    to every member.
    """

    def __call__(
        self,
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        /,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], State]:
        """Transform ``grads`` along ``reference``; return them and the new state."""
        ...


class StateMismatchError(GradlensError, TypeError):
    """A state passed to ``update`` that its transform's ``init`` did not build."""


class GradientTransform(NamedTuple):
    """A pair of pure functions that transform a gradient dict.

    Attributes:
        init: ``init(params) -> state``; ``params`` maps parameter names to
            tensors shaped like the gradients to come.
        update: ``update(grads, state, params=None, *, reference, **extra)``
            returns ``(new_grads, new_state)``; ``reference`` has the keys and
            shapes of ``grads``.
    """

    init: TransformInit
    update: TransformUpdate


class IdentityState(NamedTuple):
    """The empty state of :func:`identity`."""


def check_state(state: State, expected: type, *, factory: str) -> None:
    """Raise unless ``state`` is exactly of the NamedTuple type ``expected``.

    Args:
        state: The state passed to ``update``.
        expected: The state type that ``factory(...).init`` builds.
        factory: The factory's name, for the message.

    Raises:
        StateMismatchError: Naming what was expected and what came.
    """
    if type(state) is not expected:
        raise StateMismatchError(
            f"{factory}(...).update expected a {expected.__name__}, got a "
            f"{type(state).__name__}. Pass the state returned by this transform's init or by "
            "its previous update."
        )


def needs_example_dots(transform: GradientTransform) -> bool:
    """Whether ``transform`` (or a member of it) needs ``example_dots``: a per-example transform.

    Per-example transforms describe gradients, not updates, so a probed step
    refuses one as ``after=`` before it takes any step.
    """
    return bool(getattr(transform.update, "__gradlens_needs_example_dots__", False))


def mark_needs_example_dots(update: TransformUpdate, needed: bool = True) -> None:
    """Mark ``update`` as needing ``example_dots`` (see :func:`needs_example_dots`)."""
    if needed:
        update.__gradlens_needs_example_dots__ = True  # type: ignore[attr-defined]


def identity() -> GradientTransform:
    """Return the transform that leaves gradients unchanged.

    Returns:
        A :class:`GradientTransform` whose state is an empty :class:`IdentityState`.
    """

    def init(params: Mapping[str, Tensor]) -> IdentityState:
        del params
        return IdentityState()

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], IdentityState]:
        del params, reference, extra
        check_state(state, IdentityState, factory="identity")
        return dict(grads), state

    return GradientTransform(init, update)
