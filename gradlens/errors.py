"""Errors raised by gradlens, each naming its cause and the fix."""

from __future__ import annotations

__all__ = [
    "DataNotFoundError",
    "GradientMismatchError",
    "GradlensError",
    "NonFiniteGradientError",
    "UnsupportedModelError",
]


class GradlensError(Exception):
    """Base class of every error gradlens raises on purpose."""


class UnsupportedModelError(GradlensError, ValueError):
    """A model that the per-example (vmap) path cannot handle as it is."""


class GradientMismatchError(GradlensError, ValueError):
    """Two gradient dicts whose keys or shapes do not line up."""


class NonFiniteGradientError(GradlensError, FloatingPointError):
    """A gradient with NaN or infinite entries.

    Attributes:
        step: The training step at which it was found, or ``None``.
        names: The parameter names whose gradients are not finite.
    """

    def __init__(self, message: str, *, step: int | None, names: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.names = names


class DataNotFoundError(GradlensError, FileNotFoundError):
    """A dataset that is in none of the places gradlens looked."""
