"""Holding Ctrl-C while netCDF4-python's own code runs, and raising it afterwards (private).

netCDF4-python catches every exception in several places with a bare
``except:`` (its ``utils.py``: index parsing, dimension lookup, broadcasting
checks). A ``KeyboardInterrupt`` that lands in one of them is either
swallowed, so that the writer goes on and takes another code path, or turned
into an ``IndexError`` or ``ValueError`` that names no interruption. Either
way a recorder could not keep its promise that a Ctrl-C leaves the file as of
the previous flush and raises ``KeyboardInterrupt``.

:func:`interrupts_held` therefore replaces the SIGINT handler for the length
of a write: a Ctrl-C pressed meanwhile is held, and once the write is over
(the file closed), the original handler runs as it would have, which for
Python's default handler raises ``KeyboardInterrupt`` there. Every press is
held, not only the first: a write blocked in the C library does not return
to Python to run a handler anyway, so a second press could not stop it
sooner, only land in the same bare ``except:``.

It holds nothing outside the main thread (Python runs signal handlers there
only), and leaves ``SIG_IGN``, ``SIG_DFL`` and handlers installed from C alone.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["interrupts_held"]


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT in the block; on leaving it, run the original handler once if one came.

    Yields:
        Nothing; the block runs with SIGINT held.

    Raises:
        KeyboardInterrupt: On leaving the block, if Ctrl-C was pressed in it and
            the original handler is Python's default one (whatever the original
            handler raises, in general). If the block raised as well, its
            exception is the ``KeyboardInterrupt``'s ``__context__``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    original = signal.getsignal(signal.SIGINT)
    if not callable(original):  # SIG_IGN, SIG_DFL, or a handler set outside Python
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, original)
        if received:
            original(signal.SIGINT, sys._getframe())
