"""Checks read every n steps instead of every step: a probed step with no host reads.

A probed step checks what it computed: every gradient is finite, the batch loss
is the mean of its examples' losses, an example alone gives the output it has in
the batch. Each check's verdict is a device flag
(:class:`~gradlens.probes.checks.DeferredCheck`), and reading the flags costs one
host read per step, which on a GPU waits for the queue of kernels.

Inside :func:`deferred_checks` the flags are kept on the device instead and read
once every ``every`` steps, and when the block ends: a steady-state step then
makes no host read of its own. The price is that a failure is raised up to
``every - 1`` steps after the step that made it, and those steps were applied
(and recorded). The error is the one the step would have raised, with a note
naming the step that failed and the step that found it out; its records from
that step on are not to be trusted. Checks of planning (a step's first batch of
a new shape) are never deferred.

Example:
    >>> import torch
    >>> from gradlens.probes.checks import DeferredCheck, settle
    >>> with deferred_checks(every=2) as ledger:
    ...     settle([DeferredCheck(torch.tensor(False), lambda: None)])
    ...     ledger.end_step(0)
    ...     len(ledger)
    1
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradlens.probes.checks import DeferredCheck

__all__ = ["CheckLedger", "active_ledger", "deferred_checks"]

_LEDGER: ContextVar[CheckLedger | None] = ContextVar("gradlens_check_ledger", default=None)


class CheckLedger:
    """The device flags of the checks since the last read, each with the step that made it.

    Args:
        every: Read the flags after this many steps (:meth:`end_step` calls).

    Attributes:
        every: As given.
    """

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"deferred_checks(every=...) must be an int >= 1, got {every!r}.")
        self.every = every
        self._entries: list[tuple[int | None, DeferredCheck]] = []
        self._open: list[DeferredCheck] = []
        self._steps = 0
        self._last: int | None = None

    def __len__(self) -> int:
        """The checks held, of ended steps and of the step under way."""
        return len(self._entries) + len(self._open)

    def add(self, checks: Sequence[DeferredCheck]) -> None:
        """Hold ``checks`` (of the step under way) until the next read."""
        self._open.extend(checks)

    def end_step(self, step: int | None) -> None:
        """Label the held checks with ``step``; read every flag if ``every`` steps have ended."""
        self._entries.extend((step, check) for check in self._open)
        self._open = []
        self._last = step
        self._steps += 1
        if self._steps >= self.every:
            self.read()

    def read(self) -> None:
        """Read every held flag (one host read) and raise the first failing check's error.

        Raises:
            The failing check's own error (for example
            :class:`~gradlens.errors.NonFiniteGradientError`), with a note naming
            the step that failed and the step it was read at.
        """
        entries = self._entries + [(self._last, check) for check in self._open]
        self._entries, self._open, self._steps = [], [], 0
        if not entries:
            return
        flags = torch.stack([check.failed.reshape(()) for _, check in entries])
        failed = flags.tolist()  # the one read
        for (step, check), bad in zip(entries, failed, strict=True):
            if bad:
                token = _LEDGER.set(None)  # an explanation's own checks read now
                try:
                    check.explain()
                except Exception as exc:
                    _note(exc, step, self._last)
                    raise
                finally:
                    _LEDGER.reset(token)
                raise RuntimeError(  # a check whose flag is set must explain itself
                    f"a deferred check of step {step} failed but gave no error; report this."
                )


def _note(exc: Exception, step: int | None, read_at: int | None) -> None:
    """Add to ``exc`` that it was found by a deferred read."""
    note = (
        f"(found by deferred_checks: the check failed at step {step} and was read at step "
        f"{read_at}; the steps in between were applied, and their records are not to be "
        "trusted)"
    )
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args:  # Python 3.10
        exc.args = (f"{exc.args[0]}\n{note}", *exc.args[1:])


def active_ledger() -> CheckLedger | None:
    """The ledger of the innermost :func:`deferred_checks` block, if any."""
    return _LEDGER.get()


@contextmanager
def deferred_checks(every: int = 100) -> Iterator[CheckLedger]:
    """Read the probed step's checks every ``every`` steps, and once more at the end.

    Args:
        every: Steps between reads (``1`` reads every step, as without the block).

    Yields:
        The :class:`CheckLedger`; call its ``read()`` to check at a point of your
        own (before saving a checkpoint, say).

    Raises:
        ValueError: If ``every`` is not an int >= 1.
        The first failing check's error, at the read after its step, with a note
        naming that step. Leaving the block through an exception reads nothing.
    """
    ledger = CheckLedger(every)
    token = _LEDGER.set(ledger)
    try:
        yield ledger
    except BaseException:
        _LEDGER.reset(token)
        raise
    _LEDGER.reset(token)
    ledger.read()
