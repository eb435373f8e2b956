"""A sweep's parts, and which of them still have to run (private)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gradlens.sweeps._files import CodeVersion, code_version, part_state
from gradlens.sweeps._locks import read_lock

__all__ = ["Part", "Plan", "part_problems", "pending_parts", "plan_parts"]


@dataclass(frozen=True)
class Part:
    """One independent piece of a sweep.

    Attributes:
        path: The run file that ``fn(arg)`` writes: renamed into place, or marked
            complete (global attr ``complete = 1``), only when it is complete.
        fn: A picklable callable (a module-level function), called as ``fn(arg)``
            in the job; its return value is ignored.
        arg: Its argument, picklable.
        config: The config that ``path`` must store to count as done: a
            dataclass instance or a Mapping, compared as its JSON form.
    """

    path: Path
    fn: Callable[[Any], object]
    arg: Any
    config: object


def part_problems(part: Part, ignore: Collection[str] = ()) -> list[str]:
    """Why the file at ``part.path`` is not this part's finished output (empty when it is).

    Any code version counts here; :func:`pending_parts` checks the version.

    Args:
        part: The part; its file must exist.
        ignore: Config fields that do not change what a part holds.

    Returns:
        Reasons, each naming the file: unreadable, no config or another config,
        or not marked complete. Empty when the part is done.
    """
    found = part_state(part.path, part.config, ignore=ignore)
    return [] if found.state == "done" else [found.reason or f"{part.path} does not exist"]


def pending_parts(
    parts: Sequence[Part],
    *,
    ignore: Collection[str] = (),
    check: Callable[[Part], list[str]] | None = None,
    overwrite: bool = False,
    reuse_other_versions: bool = False,
    version: CodeVersion | None = None,
) -> list[Part]:
    """The parts that still have to run, and are not running.

    A part has to run when its file is missing, not marked complete (cut
    short), or computed by another code version (unless
    ``reuse_other_versions``). A part whose lock is held by a job that still
    runs (or that cannot be checked from here) is not pending: it is being run.

    Args:
        parts: The sweep.
        ignore: Config fields that do not change what a part holds.
        check: More reasons a complete file with the right config is not
            reusable (for example an initialisation seed the config does not
            hold); returns an empty list when it is.
        overwrite: Run every part again (each replaces its file when it
            completes), but those running.
        reuse_other_versions: Reuse complete parts computed by another gradlens
            version or git commit.
        version: The version parts must have (default: :func:`code_version`, this code's).

    Returns:
        The parts to run, in the order given.

    Raises:
        FileExistsError: If a part's file was written with another config (or
            cannot be read, or fails ``check``), naming each and ``overwrite``.
        ValueError: If two parts write the same path.
    """
    return plan_parts(
        parts,
        ignore=ignore,
        check=check,
        overwrite=overwrite,
        reuse_other_versions=reuse_other_versions,
        version=version,
    ).todo


class Plan(NamedTuple):
    """The parts to run and those being run by earlier jobs (with who holds each)."""

    todo: list[Part]
    running: dict[Path, str]


def plan_parts(
    parts: Sequence[Part],
    *,
    ignore: Collection[str] = (),
    check: Callable[[Part], list[str]] | None = None,
    overwrite: bool = False,
    reuse_other_versions: bool = False,
    version: CodeVersion | None = None,
) -> Plan:
    """:func:`pending_parts`, and the parts held by running jobs."""
    paths = [p.path for p in parts]
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"several parts write {twice}; give every part its own path.")
    if not reuse_other_versions and version is None:
        version = code_version()
    todo, running, problems = [], {}, []
    for part in parts:
        lock = read_lock(part.path)
        if lock is not None and lock.state != "gone":
            running[part.path] = lock.holder
            continue
        if overwrite:
            todo.append(part)
            continue
        found = part_state(
            part.path, part.config, ignore=ignore, version=None if reuse_other_versions else version
        )
        reasons = [found.reason] if found.state == "refused" else []
        if found.state == "done" and check is not None:
            reasons = check(part)
        if found.state in ("missing", "incomplete", "other version"):
            todo.append(part)
        problems += reasons
    if problems:
        listed = "\n  ".join(problems)
        raise FileExistsError(
            f"these part files hold results of another configuration:\n  {listed}\n"
            "Pass overwrite=True to run those parts again and replace them, or write the "
            "sweep to another folder."
        )
    return Plan(todo, running)
