"""Errors raised by gradlens, each naming its cause and the fix."""

from __future__ import annotations

__all__ = [
    "DamagedDataError",
    "DataNotFoundError",
    "GradientMismatchError",
    "GradlensError",
    "NonFiniteGradientError",
    "PrecisionWarning",
    "RecordWriteError",
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


class DamagedDataError(GradlensError, ValueError):
    """A data file that exists but cannot be what it claims to be (truncated, swapped, corrupt).

    Attributes:
        filename: The file at fault.
    """

    def __init__(self, message: str, *, filename: str) -> None:
        super().__init__(message)
        self.filename = filename


class RecordWriteError(GradlensError, OSError):
    """A :class:`~gradlens.records.Recorder` that could not write its file (a full disk, say).

    The recorder is closed; the file at its path still holds every row up to
    its last successful flush.

    Attributes:
        errno: The cause's error number (``errno.ENOSPC`` for a full disk), or ``None``.
        filename: The file that could not be written.
    """

    def __init__(self, message: str, *, errno: int | None, filename: str) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return self.message


class PrecisionWarning(UserWarning):
    """A recorded alignment within the rounding noise of the reduced precision it ran in.

    Issued (once per process and dtype, by the default warning filter) when a
    probe runs under ``torch.autocast`` or on bfloat16/float16 parameters and
    a batch cosine ``|cos(g, reference)|`` is below the measured noise floor of
    cosines in that dtype (:data:`gradlens.probes.precision.NOISE_FLOOR`).
    Silence it with ``warnings.filterwarnings("ignore", category=PrecisionWarning)``.
    """
