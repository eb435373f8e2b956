"""Provenance attrs stamped on every record: versions, time, git commit, config.

netCDF stores only strings and numbers as attributes (no ``None``, ``bool``,
``dict`` or datetime), so every value :func:`make_attrs` returns is a ``str``
and the config is a JSON string, read back with :func:`config_from_attrs`.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Config:
    ...     lr: float = 0.1
    ...     widths: tuple[int, ...] = (32, 32)
    >>> attrs = make_attrs(Config())
    >>> all(isinstance(value, str) for value in attrs.values())
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

import gradlens

__all__ = ["config_from_attrs", "git_commit", "make_attrs"]


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
    if os.environ.get("GRADLENS_GIT_COMMIT"):
        return os.environ["GRADLENS_GIT_COMMIT"]
    for place in places or (Path.cwd(), Path(gradlens.__file__).parent):
        try:
            done = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=place,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return "unknown"


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


def make_attrs(config: object | None = None) -> dict[str, str]:
    """Return the provenance attrs of a record, every value a ``str``.

    Args:
        config: The run's config, a dataclass instance or a Mapping; stored as
            JSON under ``"config"``. With ``None`` the key is left out.

    Returns:
        ``gradlens_version``, ``torch_version``, ``xarray_version``,
        ``numpy_version``, ``python_version``, ``created_at`` (ISO 8601, UTC),
        ``git_commit`` (see :func:`git_commit`) and, given a config, ``config``.

    Raises:
        TypeError: If ``config`` cannot be encoded as JSON.
    """
    attrs = {
        "gradlens_version": str(gradlens.__version__),
        "torch_version": str(torch.__version__),
        "xarray_version": xr.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
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
