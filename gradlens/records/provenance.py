"""Provenance attrs stamped on every record: versions, times, git state, config.

A run's provenance is taken once, when the run starts (:func:`run_provenance`,
an immutable :class:`RunProvenance`), so a file written later still names the
code that ran, not the code checked out by then; ``git_dirty`` says whether
that code differed from its commit. :class:`~gradlens.Recorder` takes the
snapshot when it is constructed.

netCDF stores only strings and numbers as attributes (no ``None``, ``bool``,
``dict`` or datetime), so every value :func:`make_attrs` returns is a ``str``
or an ``int`` and the config is a JSON string, read back with
:func:`config_from_attrs`.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Config:
    ...     lr: float = 0.1
    ...     widths: tuple[int, ...] = (32, 32)
    >>> start = run_provenance()  # when the run starts
    >>> attrs = make_attrs(Config(), provenance=start)  # when its file is written
    >>> all(type(value) in (str, int) for value in attrs.values())
    True
    >>> attrs["git_commit"] == start.git_commit and attrs["git_dirty"] in (-1, 0, 1)
    True
    >>> config_from_attrs(attrs)
    {'lr': 0.1, 'widths': [32, 32]}
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
import xarray as xr

from gradlens._version import __version__

__all__ = ["RunProvenance", "config_from_attrs", "git_commit", "make_attrs", "run_provenance"]

MAX_CHANGES = 50
"""At most this many changed paths are listed in ``git_changes``; the rest are counted."""


@dataclasses.dataclass(frozen=True)
class RunProvenance:
    """What code a run ran, and where: taken once, when the run starts.

    Every field is a ``str`` or an ``int``, so :meth:`attrs` is netCDF-safe.

    Attributes:
        started_at: When the snapshot was taken, ISO 8601 in UTC.
        git_commit: ``git rev-parse HEAD``, or ``"unknown"`` (see :func:`git_commit`).
        git_dirty: 1 if the checkout differed from ``git_commit`` (modified,
            staged, deleted or untracked files), 0 if it did not, -1 if unknown
            (no checkout, or the commit came from ``GRADLENS_GIT_COMMIT``).
        git_changes: The paths that differed, relative to the checkout root,
            one per line (at most ``MAX_CHANGES``, then a count); ``""`` when clean.
        gradlens_version: Version of gradlens.
        torch_version: Version of torch.
        xarray_version: Version of xarray.
        numpy_version: Version of numpy.
        python_version: Version of Python.
    """

    started_at: str
    git_commit: str
    git_dirty: int
    git_changes: str
    gradlens_version: str
    torch_version: str
    xarray_version: str
    numpy_version: str
    python_version: str

    def attrs(self) -> dict[str, str | int]:
        """The fields as dataset attrs, by field name."""
        return dataclasses.asdict(self)


def _git(place: str | os.PathLike[str], *args: str) -> str | None:
    """Stdout of ``git args`` run in ``place``, or ``None`` if that fails in any way."""
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=place,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _changed_paths(status: str) -> list[str]:
    """Paths named by ``git status --porcelain=v1 -z`` output (a rename names its new path)."""
    entries = status.split("\0")
    paths, k = [], 0
    while k < len(entries):
        entry = entries[k]
        k += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":
            k += 1  # the original path of a rename or copy follows
    return paths


def _git_state(places: tuple[str | os.PathLike[str], ...]) -> tuple[str, int, str]:
    """``(commit, dirty, changes)`` of the first of ``places`` inside a git checkout."""
    if os.environ.get("GRADLENS_GIT_COMMIT"):
        return os.environ["GRADLENS_GIT_COMMIT"], -1, ""
    for place in places or (Path.cwd(), Path(__file__).parent):
        commit = (_git(place, "rev-parse", "HEAD") or "").strip()
        if not commit:
            continue
        status = _git(place, "status", "--porcelain=v1", "-z", "--untracked-files=normal")
        if status is None:
            return commit, -1, ""
        paths = _changed_paths(status)
        listed = paths[:MAX_CHANGES]
        if len(paths) > MAX_CHANGES:
            listed.append(f"... and {len(paths) - MAX_CHANGES} more")
        return commit, int(bool(paths)), "\n".join(listed)
    return "unknown", -1, ""


def git_commit(*places: str | os.PathLike[str]) -> str:
    """Return ``git rev-parse HEAD`` of the first of ``places`` inside a git checkout.

    Args:
        *places: Directories to try in order; by default the current working
            directory, then the directory of the gradlens package.

    Returns:
        The full commit hash, or ``"unknown"`` when no place is a git checkout
        or git is missing. A copy of a checkout without its ``.git`` folder
        (a remote machine) can name its commit in ``GRADLENS_GIT_COMMIT``.
        Never raises.
    """
    return _git_state(places)[0]


def run_provenance(*places: str | os.PathLike[str]) -> RunProvenance:
    """Take the provenance of a run now: call it when the run starts.

    Args:
        *places: Where to look for the git checkout, as in :func:`git_commit`.

    Returns:
        The time, the git commit and whether the checkout was dirty (with the
        changed paths), and the versions of gradlens and its main dependencies.
        Never raises for a missing checkout or git: those read ``"unknown"``
        and ``git_dirty = -1``.
    """
    commit, dirty, changes = _git_state(places)
    return RunProvenance(
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit,
        git_dirty=dirty,
        git_changes=changes,
        gradlens_version=__version__,
        torch_version=str(torch.__version__),
        xarray_version=xr.__version__,
        numpy_version=np.__version__,
        python_version=platform.python_version(),
    )


def _jsonable(value: object) -> Any:
    """Turn what ``json`` cannot encode into what it can (``json.dumps`` ``default`` hook)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(
        f"config holds a {type(value).__name__} ({value!r}), which has no JSON form; use "
        "str, numbers, bools, None, Paths, tuples, lists, Mappings or dataclasses."
    )


def config_to_json(config: object) -> str:
    """Encode a config dataclass or Mapping as a JSON string with sorted keys.

    Dataclasses become dicts (``dataclasses.asdict``), Mappings dicts, Paths
    strings and tuples lists.

    Raises:
        TypeError: If ``config`` is neither a dataclass instance nor a Mapping,
            or holds a value with no JSON form.
    """
    is_dataclass = dataclasses.is_dataclass(config) and not isinstance(config, type)
    if not (is_dataclass or isinstance(config, Mapping)):
        raise TypeError(
            f"config must be a dataclass instance or a Mapping, got {type(config).__name__}."
        )
    return json.dumps(config, default=_jsonable, sort_keys=True)


def make_attrs(
    config: object | None = None, *, provenance: RunProvenance | None = None
) -> dict[str, str | int]:
    """Return the provenance attrs of a record, every value a ``str`` or an ``int``.

    Args:
        config: The run's config, a dataclass instance or a Mapping; stored as
            JSON under ``"config"``. With ``None`` the key is left out.
        provenance: The snapshot taken when the run started
            (:func:`run_provenance`). Without one it is taken now, which names
            the code checked out now: pass the run's own when the record is
            written after the run.

    Returns:
        The fields of :class:`RunProvenance` (``started_at``, ``git_commit``,
        ``git_dirty``, ``git_changes`` and the versions), ``created_at`` (now,
        ISO 8601 in UTC) and, given a config, ``config``.

    Raises:
        TypeError: If ``config`` cannot be encoded as JSON.
    """
    if provenance is None:
        provenance = run_provenance()
    attrs = {
        **provenance.attrs(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config is not None:
        attrs["config"] = config_to_json(config)
    return attrs


def config_from_attrs(attrs: Mapping[str, object]) -> dict[str, Any]:
    """Decode the ``"config"`` attr written by :func:`make_attrs` back into a dict.

    Args:
        attrs: Dataset attrs, for example ``open_run(path).attrs``.

    Raises:
        KeyError: If there is no ``"config"`` attr (the run was recorded without one).
    """
    if "config" not in attrs:
        raise KeyError(
            "these attrs hold no 'config': the run was recorded without a config "
            f"(attrs present: {sorted(attrs)})."
        )
    return json.loads(str(attrs["config"]))
