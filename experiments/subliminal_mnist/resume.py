"""Where an experiment's results go, and what of them a rerun may reuse.

An output folder holds one file per (seed, condition),
``parts/seed{s}_{condition}.nc``: the block of ``--models`` models of that
seed (:mod:`subliminal_mnist.blocks`) trained under that condition, marked
complete and renamed into place only when that run is complete, with a lock
beside it while a job runs it (:mod:`gradlens.sweeps`), and the results built from them
(:func:`write_combined`, :func:`write_summary`: atomically, so a crash leaves
the previous version). Before anything is loaded or trained,
:func:`check_settings` catches the settings that would fail later (a device
that is not there, an output folder that cannot be written, no seeds), and
:func:`plan_resume` says which parts an earlier run with the same
configuration and code already finished, which are being run by jobs, and
which were computed by other code, or refuses a folder that holds results of
another configuration, so that nothing is silently replaced.

Example:
    >>> part_path(Path("runs/mnist_aux"), 0, "aux").as_posix()
    'runs/mnist_aux/parts/seed0_aux.nc'
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xarray as xr

from gradlens.records.atomic import atomic_write, atomic_write_text
from gradlens.records.provenance import config_from_attrs
from gradlens.sweeps import CodeVersion, code_version, part_state, read_lock, stored_config
from subliminal_mnist.blocks import TEACHER_ATTR

__all__ = [
    "SETTINGS_THAT_SELECT",
    "Resume",
    "check_device",
    "check_settings",
    "part_path",
    "plan_resume",
    "reusable_parts",
    "teacher_problems",
    "write_combined",
    "write_summary",
]

SETTINGS_THAT_SELECT: frozenset[str] = frozenset(
    {"seeds", "conditions", "out", "data_dir", "progress", "overwrite", "reuse_other_versions"}
)
"""Config fields that choose which parts run, or where, but not what a part holds."""

COMBINED = "mnist_aux.nc"
SUMMARY = "summary.md"


def part_path(out: Path, seed: int, condition: str) -> Path:
    """The file of one (seed, condition) run in the output folder ``out``."""
    return out / "parts" / f"seed{seed}_{condition}.nc"


def write_combined(ds: xr.Dataset, out: Path) -> Path:
    """Write the combined dataset to ``out/mnist_aux.nc`` atomically (a crash leaves the old)."""
    return atomic_write(out / COMBINED, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))


def write_summary(text: str, out: Path) -> Path:
    """Write the summary to ``out/summary.md`` atomically."""
    return atomic_write_text(out / SUMMARY, text)


def check_settings(*, seeds: int, device: str, out: Path, available: bool = True) -> torch.device:
    """Check what would otherwise fail after data loading or training; create ``out``.

    Args:
        seeds: The number of seeds.
        device: The torch device.
        out: The output folder.
        available: Check that ``device`` is on this machine (``False`` when the
            parts run elsewhere, as SLURM jobs).

    Returns:
        The torch device.

    Raises:
        ValueError: No seeds, or a device that does not exist here.
        OSError: ``out`` cannot be created or written to.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}.")
    torch_device = check_device(device, available=available)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise type(exc)(
            exc.errno,
            f"cannot write to the output folder {out} ({exc.strerror}); fix its permissions "
            "or choose another with --out",
        ) from exc
    return torch_device


def check_device(device: str, *, available: bool = True) -> torch.device:
    """The torch device named by ``--device``, checked.

    Args:
        device: The flag's value (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        available: Check that it is on this machine.

    Raises:
        ValueError: Not a torch device, or (with ``available``) not on this machine.
    """
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device ({exc}); try cpu.") from exc
    if available and not _available(torch_device):
        raise ValueError(
            f"--device {device!r} is not available on this machine "
            f"({torch.cuda.device_count()} CUDA devices); pass --device cpu."
        )
    return torch_device


def _available(device: torch.device) -> bool:
    """Whether tensors can be put on ``device`` here."""
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


class Resume(NamedTuple):
    """What an output folder holds for this run's parts (see :func:`plan_resume`).

    Attributes:
        reuse: ``(seed, condition) -> path`` of the done parts, reused.
        other_versions: The complete parts of this configuration computed by
            other code (a reason naming the file and its version): run again.
        running: The parts whose lock is held by a job that runs (a job of an
            earlier ``--executor local`` or ``slurm`` run, or another run), or
            that cannot be checked from here: ``(seed, condition) -> who holds it``.
    """

    reuse: dict[tuple[int, str], Path]
    other_versions: dict[tuple[int, str], str]
    running: dict[tuple[int, str], str]


def plan_resume(
    out: Path,
    config: object,
    seeds: Sequence[int],
    conditions: Collection[str],
    *,
    overwrite: bool = False,
    reuse_other_versions: bool = False,
    version: CodeVersion | None = None,
) -> Resume:
    """Which parts in ``out`` an earlier run with this configuration finished.

    A part is reused when it is complete (marked so when its run ended), its
    stored config equals ``config`` in every field but
    :data:`SETTINGS_THAT_SELECT` (so the same ``models``, noise, sizes and
    hyper-parameters), it stores the teachers' and references' accuracies, it
    was computed by this code (the gradlens version and git commit in its
    attrs, :class:`gradlens.sweeps.CodeVersion`; any with
    ``reuse_other_versions``), and no job is running it. A block's students
    start from initialisations that depend only on its seed and ``models``
    (``cross_init`` takes the next model of the same block), so adding seeds
    never invalidates a part. Unfinished parts (``*.nc.part``, or a part not
    marked complete) are run again.

    Args:
        out: The output folder.
        config: This run's config (a dataclass or Mapping).
        seeds: The seeds of this run.
        conditions: The condition names of this run.
        overwrite: Reuse nothing and refuse nothing: every part is run again
            and replaces the old one when it completes.
        reuse_other_versions: Reuse complete parts computed by other code.
        version: This code's version (default: :func:`gradlens.sweeps.code_version`).

    Returns:
        A :class:`Resume`.

    Raises:
        FileExistsError: If ``out`` holds results of another configuration
            (or results that cannot be checked), naming them and ``--overwrite``.
    """
    running = {}
    for seed in seeds:
        for condition in conditions:
            lock = read_lock(part_path(out, seed, condition))
            if lock is not None and lock.state != "gone":
                running[seed, condition] = lock.holder
    if overwrite:
        return Resume({}, {}, running)
    wanted = None if reuse_other_versions else (version or code_version())
    problems: list[str] = []
    combined = out / COMBINED
    if combined.exists():
        problems += _mismatch(combined, _results_config(config))
    elif (out / SUMMARY).exists():
        problems.append(f"{out / SUMMARY} has no {COMBINED} beside it to check")
    reuse, other = {}, {}
    for seed in seeds:
        for condition in conditions:
            path = part_path(out, seed, condition)
            if (seed, condition) in running:
                continue
            found = part_state(path, config, ignore=SETTINGS_THAT_SELECT, version=wanted)
            if found.state == "refused":
                problems.append(found.reason)
            elif found.state == "other version":
                other[seed, condition] = found.reason
            elif found.state == "done":
                missing = teacher_problems(path)
                problems += missing
                if not missing:
                    reuse[seed, condition] = path
    if problems:
        listed = "\n  ".join(problems)
        raise FileExistsError(
            f"{out} holds results of another configuration:\n  {listed}\nPass --overwrite "
            "(overwrite=True) to run again and replace them, or choose another --out."
        )
    return Resume(reuse, other, running)


def reusable_parts(
    out: Path,
    config: object,
    seeds: Sequence[int],
    conditions: Collection[str],
    *,
    overwrite: bool = False,
    reuse_other_versions: bool = False,
) -> dict[tuple[int, str], Path]:
    """The done parts in ``out`` that an earlier run with this configuration wrote.

    ``(seed, condition) -> path``; :func:`plan_resume` says which and why.

    Raises:
        FileExistsError: If ``out`` holds results of another configuration.
    """
    return plan_resume(
        out,
        config,
        seeds,
        conditions,
        overwrite=overwrite,
        reuse_other_versions=reuse_other_versions,
    ).reuse


def teacher_problems(path: Path) -> list[str]:
    """Why the part file ``path`` lacks its block's teacher metrics (empty when it has them)."""
    with xr.open_dataset(path, engine="netcdf4", decode_times=False) as run:
        if TEACHER_ATTR in run.attrs:
            return []
    return [f"{path} was written before parts held a block of models (no {TEACHER_ATTR})"]


def _results_config(config: object) -> dict[str, Any]:
    """The config as stored in a file, less the fields that only select and the unset ones."""
    return stored_config(config, SETTINGS_THAT_SELECT)


def _mismatch(path: Path, wanted: dict[str, Any]) -> list[str]:
    """Why the combined results file ``path`` is not this configuration's (empty when it is)."""
    try:
        with xr.open_dataset(path, engine="netcdf4", decode_times=False) as ds:
            attrs = dict(ds.attrs)
    except (OSError, ValueError) as exc:
        return [f"{path} cannot be read ({exc})"]
    try:
        stored = stored_config(config_from_attrs(attrs), SETTINGS_THAT_SELECT)
    except (KeyError, ValueError):
        return [f"{path} stores no config"]
    if stored != wanted:
        changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        return [f"{path} was written with other {', '.join(changed)}"]
    return []
