"""Run a sweep's independent parts on submitit: locally, or as a SLURM job array.

A sweep is a list of :class:`Part` s. Each part is a picklable callable and
its argument, ``fn(arg)``, that writes one run file, ``path``, recorded with
its config (a :class:`~gradlens.Recorder` given ``config=`` stores it as
JSON in the file's attrs). The part-file contract, the same as the MNIST
experiment's:

- a part writes to a temporary name beside ``path`` and renames it onto
  ``path`` only when it is complete, so a file at ``path`` is a finished part;
- a part is *done* when ``path`` exists and its stored config equals the
  part's ``config`` in every field but ``ignore`` (the fields that only
  choose which parts run or where, not what a part holds);
- a file at ``path`` written with another config is never silently
  replaced: :func:`pending_parts` refuses it unless ``overwrite``.

:func:`run_sweep` submits the parts that are not done to a submitit executor
in one batch (on SLURM, one job array), waits for them, and checks that each
wrote its file. Resubmitting the same sweep after a crash, a timeout or a
preempted node runs only what is missing. Merging the part files into one
dataset is the caller's.
:func:`make_executor` builds the executor: ``cluster="local"`` (default)
runs every part as a subprocess of this machine, ``"slurm"`` submits a
job array, ``"debug"`` runs them one after another in this process.
submitit is an optional dependency (``pip install gradlens[sweep]``).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> part = Part(folder / "seed0.nc", print, "hello", {"seed": 0})
    >>> [p.path.name for p in pending_parts([part])]  # nothing written yet
    ['seed0.nc']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import xarray as xr

from gradlens.records.provenance import config_from_attrs, config_to_json

__all__ = ["Part", "Sweep", "make_executor", "part_problems", "pending_parts", "run_sweep"]


@dataclass(frozen=True)
class Part:
    """One independent piece of a sweep.

    Attributes:
        path: The run file that ``fn(arg)`` writes (renamed into place when complete).
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


class Sweep(NamedTuple):
    """What :func:`run_sweep` did.

    Attributes:
        skipped: The paths of the parts that were already done.
        submitted: The paths of the parts submitted, in the order of ``jobs``.
        jobs: The submitit jobs, one per submitted part (``job.job_id``,
            ``job.stdout()``, ``job.result()``).
    """

    skipped: tuple[Path, ...]
    submitted: tuple[Path, ...]
    jobs: tuple[Any, ...]


def _stored(config: object, ignore: Collection[str]) -> dict[str, Any]:
    """The config as a file stores it, less the ignored fields."""
    found = json.loads(config_to_json(config))
    return {k: v for k, v in found.items() if k not in ignore}


def part_problems(part: Part, ignore: Collection[str] = ()) -> list[str]:
    """Why the file at ``part.path`` is not this part's finished output (empty when it is).

    Args:
        part: The part; its file must exist.
        ignore: Config fields that do not change what a part holds.

    Returns:
        Reasons, each naming the file; empty when the part is done.
    """
    try:
        with xr.open_dataset(part.path, engine="netcdf4", decode_times=False) as ds:
            attrs = dict(ds.attrs)
    except (OSError, ValueError) as exc:
        return [f"{part.path} cannot be read ({exc})"]
    try:
        stored = _stored(config_from_attrs(attrs), ignore)
    except (KeyError, ValueError):
        return [f"{part.path} stores no config"]
    wanted = _stored(part.config, ignore)
    if stored != wanted:
        changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        return [f"{part.path} was written with other {', '.join(changed)}"]
    return []


def pending_parts(
    parts: Sequence[Part],
    *,
    ignore: Collection[str] = (),
    check: Callable[[Part], list[str]] | None = None,
    overwrite: bool = False,
) -> list[Part]:
    """The parts that still have to run: those whose file is missing.

    Args:
        parts: The sweep.
        ignore: Config fields that do not change what a part holds.
        check: More reasons a present file with the right config is not
            reusable (for example an initialisation seed the config does not
            hold); returns an empty list when it is.
        overwrite: Run every part again (each replaces its file when it completes).

    Returns:
        The parts to run, in the order given.

    Raises:
        FileExistsError: If a part's file was written with another config (or
            cannot be read, or fails ``check``), naming each and ``overwrite``.
        ValueError: If two parts write the same path.
    """
    paths = [p.path for p in parts]
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"several parts write {twice}; give every part its own path.")
    if overwrite:
        return list(parts)
    todo, problems = [], []
    for part in parts:
        if not part.path.exists():
            todo.append(part)
            continue
        found = part_problems(part, ignore)
        if not found and check is not None:
            found = check(part)
        problems += found
    if problems:
        listed = "\n  ".join(problems)
        raise FileExistsError(
            f"these part files hold results of another configuration:\n  {listed}\n"
            "Pass overwrite=True to run those parts again and replace them, or write the "
            "sweep to another folder."
        )
    return todo


def make_executor(
    folder: str | os.PathLike[str],
    cluster: str | None = "local",
    *,
    timeout_min: int = 24 * 60,
    **parameters: Any,
) -> Any:
    """A submitit executor for :func:`run_sweep`.

    Args:
        folder: Where submitit keeps each job's pickles and logs (``%j`` is
            replaced by the job id).
        cluster: ``"local"`` (subprocesses here, all at once), ``"slurm"``,
            ``"debug"`` (in this process, one at a time) or ``None`` to detect
            (SLURM where ``sbatch`` exists, else local).
        timeout_min: Each part's time limit in minutes (submitit's local
            default, 2, would end real parts).
        **parameters: More submitit parameters, as ``AutoExecutor.update_parameters``
            takes them: ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``,
            ``slurm_partition``, ``slurm_array_parallelism``, ...

    Returns:
        A ``submitit.AutoExecutor``.

    Raises:
        ImportError: If submitit is not installed, naming the extra that installs it.
    """
    try:
        import submitit
    except ImportError as exc:  # pragma: no cover - submitit is in the dev extra
        raise ImportError(
            "gradlens.sweeps runs parts through submitit, which is not installed: "
            "pip install 'gradlens[sweep]' (or pip install submitit)."
        ) from exc
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(timeout_min=timeout_min, **parameters)
    return executor


def run_sweep(
    parts: Sequence[Part],
    executor: Any,
    *,
    ignore: Collection[str] = (),
    check: Callable[[Part], list[str]] | None = None,
    overwrite: bool = False,
    wait: bool = True,
) -> Sweep:
    """Submit the parts that are not done, in one batch, and (by default) wait for them.

    Args:
        parts: The sweep.
        executor: A submitit executor (:func:`make_executor`).
        ignore: Config fields that do not change what a part holds.
        check: As in :func:`pending_parts`.
        overwrite: Run every part again.
        wait: Wait for every job, re-raise the first failure, and check that
            every part wrote its file. Without it, return at once (call
            :func:`run_sweep` again later: finished parts are then skipped).

    Returns:
        A :class:`Sweep`.

    Raises:
        FileExistsError: As :func:`pending_parts`.
        RuntimeError: With ``wait``, if a part failed (its error and the job's
            log folder are named) or returned without writing its file.
    """
    todo = pending_parts(parts, ignore=ignore, check=check, overwrite=overwrite)
    running = {id(p) for p in todo}
    skipped = tuple(p.path for p in parts if id(p) not in running)
    jobs: list[Any] = []
    if todo:
        with executor.batch():
            jobs = [executor.submit(part.fn, part.arg) for part in todo]
    sweep = Sweep(skipped, tuple(p.path for p in todo), tuple(jobs))
    if not wait:
        return sweep
    failures = []
    for part, job in zip(todo, jobs, strict=True):
        try:
            job.result()
        except Exception as exc:  # the part's own error, re-raised by submitit
            failures.append(f"{part.path}: job {job.job_id} failed ({type(exc).__name__}: {exc})")
            continue
        if not part.path.exists():
            failures.append(f"{part.path}: job {job.job_id} returned without writing it")
        elif found := part_problems(part, ignore):
            failures += found
    if failures:
        listed = "\n  ".join(failures)
        raise RuntimeError(
            f"{len(failures)} of {len(todo)} parts did not finish:\n  {listed}\n"
            f"Their logs are in {executor.folder}; fix the cause and call run_sweep again "
            "(finished parts are skipped)."
        )
    return sweep
