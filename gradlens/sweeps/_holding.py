"""Holding parts that this process runs, and waiting for parts that jobs run (private)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from gradlens.sweeps._locks import Lock, claim, read_lock, release, this_process

__all__ = ["hold_parts", "wait_for_parts"]


@contextlib.contextmanager
def hold_parts(
    paths: Iterable[str | os.PathLike[str]], *, cluster: str = "inline"
) -> Iterator[None]:
    """Lock parts that this process runs itself, and unlock them afterwards.

    So that no job of a sweep runs them at the same time; a killed process
    leaves its locks stale (its pid is gone), and they are replaced.

    Raises:
        PartLockedError: If one of them is held by a job that runs or cannot be checked
            (none is then locked).
    """
    held: list[tuple[Path, str]] = []
    try:
        for path in paths:
            held.append((Path(path), claim(path, cluster=cluster, job=this_process())))
        yield
    finally:
        for path, token in held:
            release(path, token)


def wait_for_parts(
    paths: Iterable[str | os.PathLike[str]], *, poll_s: float = 0.1, max_poll_s: float = 10.0
) -> dict[Path, Lock]:
    """Wait until no part of ``paths`` is held by a running job.

    Polls each lock (every ``poll_s`` seconds at first, backing off to
    ``max_poll_s``; a SLURM lock costs one ``squeue`` call) until it is
    released or stale.

    Returns:
        The locks that cannot be checked from here (a job on another host, no
        ``squeue``), by part file: those were not waited for.
    """
    pending = [Path(p) for p in paths]
    unknown: dict[Path, Lock] = {}
    delay = poll_s
    while pending:
        still = []
        for path in pending:
            lock = read_lock(path)
            if lock is not None and lock.state == "unknown":
                unknown[path] = lock
            elif lock is not None and lock.state == "running":
                still.append(path)
        pending = still
        if pending:
            time.sleep(delay)
            delay = min(delay * 1.5, max_poll_s)
    return unknown
