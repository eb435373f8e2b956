"""What a part file at its path is: missing, done, incomplete, of other code, or refused (private).

A part's file is *done* when it is complete (:func:`is_complete`), stores the
part's config in every field but ``ignore``, and was written by this code
version (:class:`CodeVersion`: the gradlens version and the git commit of its
provenance attrs), unless other versions are reused on purpose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import netCDF4
import xarray as xr

from gradlens.records import is_complete as records_is_complete
from gradlens.records.provenance import (
    RunProvenance,
    config_from_attrs,
    config_to_json,
    run_provenance,
)

__all__ = [
    "COMPLETE_ATTR",
    "CodeVersion",
    "PartState",
    "code_version",
    "file_version",
    "is_complete",
    "mark_complete",
    "part_state",
]

COMPLETE_ATTR = "complete"
"""The global attr that marks a run file complete: the int 1 (missing or 0 otherwise)."""


# The one place the sweeps decide whether a run file is complete: the Recorder's marker.
# mark_complete is for part files written without a Recorder.
def is_complete(path: str | Path) -> bool:
    """Whether the netCDF file ``path`` is marked complete (global attr ``complete`` = 1).

    :func:`gradlens.records.is_complete`, the Recorder's own marker (set by a
    clean ``close()``); here a file that cannot be read counts as not
    complete (it is rerun) instead of raising.
    """
    try:
        return records_is_complete(path)
    except OSError:
        return False


def mark_complete(path: str | Path) -> Path:
    """Mark the closed netCDF file ``path`` complete (``complete = 1``) and flush it to disk.

    Call it on the finished file before renaming it into place; a Recorder that
    marks its own file makes this unnecessary (see :func:`is_complete`).
    """
    with netCDF4.Dataset(path, "a") as ds:
        ds.setncattr(COMPLETE_ATTR, 1)
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
    return Path(path)


class CodeVersion(NamedTuple):
    """The code that computed a part: what a part must share with this code to be reused.

    Attributes:
        gradlens_version: ``gradlens.__version__``.
        git_commit: The commit of the checkout (``"unknown"`` outside one).
    """

    gradlens_version: str
    git_commit: str

    def __str__(self) -> str:
        return f"gradlens {self.gradlens_version} at commit {self.git_commit[:12]}"


def code_version(provenance: RunProvenance | None = None) -> CodeVersion:
    """The code version of ``provenance``; by default of the code running now."""
    found = provenance or run_provenance()
    return CodeVersion(found.gradlens_version, found.git_commit)


def file_version(attrs: Mapping[str, object]) -> CodeVersion | None:
    """The version stored in a run file's provenance attrs, or ``None`` if it stores none."""
    if "gradlens_version" not in attrs or "git_commit" not in attrs:
        return None
    return CodeVersion(str(attrs["gradlens_version"]), str(attrs["git_commit"]))


class PartState(NamedTuple):
    """What the file at a part's path is.

    Attributes:
        state: ``"missing"``; ``"done"``; ``"incomplete"`` (not marked complete: it is run
            again); ``"other version"`` (complete, the same config, computed by another
            code version: run again unless other versions are reused); ``"refused"`` (it
            cannot be read, stores no config or another config: never replaced silently).
        reason: Why, naming the file (empty when done or missing).
        version: The version stored in the file (``None`` if none, or no file).
    """

    state: Literal["missing", "done", "incomplete", "other version", "refused"]
    reason: str
    version: CodeVersion | None


def stored_config(config: object, ignore: Collection[str]) -> dict[str, Any]:
    """The config as a file stores it (JSON), less the ignored fields and those set to ``None``.

    A top-level field whose value is ``None`` (unset) compares as absent, so a field
    added to a config later with a ``None`` default leaves the files written before
    it comparable (their config lacks the field).
    """
    found = json.loads(config_to_json(config))
    return {k: v for k, v in found.items() if k not in ignore and v is not None}


def part_state(
    path: Path,
    config: object,
    *,
    ignore: Collection[str] = (),
    version: CodeVersion | None = None,
) -> PartState:
    """What the file at ``path`` is, for a part that must store ``config``.

    Args:
        path: The part's file.
        config: The config the file must store (a dataclass or a Mapping).
        ignore: Config fields that do not change what a part holds.
        version: The code version the file must have been written by; ``None``
            accepts any (other versions are reused).

    Returns:
        A :class:`PartState`. The config is checked first, so a file of another
        config is refused even when it is incomplete.
    """
    path = Path(path)
    if not path.exists():
        return PartState("missing", "", None)
    try:
        with xr.open_dataset(path, engine="netcdf4", decode_times=False) as ds:
            attrs = dict(ds.attrs)
    except (OSError, ValueError) as exc:
        return PartState("refused", f"{path} cannot be read ({exc})", None)
    found = file_version(attrs)
    try:
        stored = stored_config(config_from_attrs(attrs), ignore)
    except (KeyError, ValueError):
        return PartState("refused", f"{path} stores no config", found)
    wanted = stored_config(config, ignore)
    if stored != wanted:
        changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        return PartState("refused", f"{path} was written with other {', '.join(changed)}", found)
    if not is_complete(path):
        return PartState("incomplete", f"{path} is not marked complete (cut short)", found)
    if version is not None and found != version:
        by = str(found) if found else "code of unknown version"
        return PartState("other version", f"{path} was computed by {by}, not {version}", found)
    return PartState("done", "", found)
