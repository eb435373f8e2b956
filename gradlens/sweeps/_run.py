"""Submitting a sweep's parts to submitit, and waiting for them (private)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from gradlens.sweeps._files import code_version, part_state
from gradlens.sweeps._holding import wait_for_parts
from gradlens.sweeps._locks import (
    PartLockedError,
    adopt,
    claim,
    lock_path,
    note_job,
    read_lock,
    release,
)
from gradlens.sweeps._parts import Part, part_problems, plan_parts

__all__ = ["Sweep", "make_executor", "run_sweep"]

_CLUSTERS = {"LocalExecutor": "local", "SlurmExecutor": "slurm", "DebugExecutor": "debug"}


class Sweep(NamedTuple):
    """What :func:`run_sweep` did.

    Attributes:
        skipped: The paths of the parts that were already done.
        submitted: The paths of the parts submitted, in the order of ``jobs``.
        jobs: The submitit jobs, one per submitted part (``job.job_id``,
            ``job.stdout()``, ``job.result()``).
        running: The paths of the parts found running under earlier jobs (their
            lock is held by a live job): not submitted again; with ``wait``,
            waited for.
    """

    skipped: tuple[Path, ...]
    submitted: tuple[Path, ...]
    jobs: tuple[Any, ...]
    running: tuple[Path, ...] = ()


class _Task(NamedTuple):
    fn: Callable[[Any], object]
    arg: Any
    path: Path
    token: str


def _job_id_here() -> str | None:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not in a submitit job
        return None


def run_part_job(task: _Task) -> object:
    """What a job runs: ``fn(arg)``, holding the part's lock, which it removes at the end.

    Raises:
        PartLockedError: If the part's lock is no longer this submission's (it
            was found stale and taken over): the part is then not run.
    """
    if not adopt(task.path, task.token, _job_id_here()):
        lock = read_lock(task.path)
        holder = lock.holder if lock else "nobody (its lock is gone)"
        raise PartLockedError(task.path, lock_path(task.path), f"{holder}, not this job", "running")
    try:
        return task.fn(task.arg)
    finally:
        release(task.path, task.token)


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
            ``"debug"`` (in this process, one at a time, when waited for) or
            ``None`` to detect (SLURM where ``sbatch`` exists, else local).
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


def _cluster(executor: Any) -> str:
    name = type(executor).__name__
    return str(getattr(executor, "cluster", None) or _CLUSTERS.get(name, name))


def _submit(parts: Sequence[Part], executor: Any) -> tuple[list[Part], list[Any], list[Path]]:
    """Lock and submit ``parts`` in one batch: (submitted, jobs, found running meanwhile)."""
    cluster = _cluster(executor)
    claimed: list[tuple[Part, str]] = []
    raced: list[Path] = []
    try:
        for part in parts:
            try:
                claimed.append((part, claim(part.path, cluster=cluster, folder=executor.folder)))
            except PartLockedError:  # another driver submitted it since we looked
                raced.append(part.path)
        jobs: list[Any] = []
        if claimed:
            with executor.batch():
                jobs = [
                    executor.submit(run_part_job, _Task(p.fn, p.arg, p.path, token))
                    for p, token in claimed
                ]
    except BaseException:
        for part, token in claimed:  # a job that did start finds its lock gone and stops
            release(part.path, token)
        raise
    for (part, token), job in zip(claimed, jobs, strict=True):
        note_job(part.path, token, job.job_id, cluster)
    return [p for p, _ in claimed], jobs, raced


def run_sweep(
    parts: Sequence[Part],
    executor: Any,
    *,
    ignore: Collection[str] = (),
    check: Callable[[Part], list[str]] | None = None,
    overwrite: bool = False,
    reuse_other_versions: bool = False,
    wait: bool = True,
    poll_s: float = 0.1,
) -> Sweep:
    """Submit the parts that are neither done nor running, in one batch; by default, wait.

    Each submitted part is locked first (``<path>.lock``, see
    :mod:`gradlens.sweeps`); a part whose lock is held by a live job (of an
    earlier call, or of a driver that was killed) is not submitted again.

    Args:
        parts: The sweep.
        executor: A submitit executor (:func:`make_executor`).
        ignore: Config fields that do not change what a part holds.
        check: As in :func:`pending_parts`.
        overwrite: Run every part again (but those running).
        reuse_other_versions: Reuse complete parts computed by another gradlens
            version or git commit (by default they are run again).
        wait: Wait for the submitted jobs and for the parts found running; a
            part found running that ends without a done file is submitted once
            more; then re-raise failures and check that every part wrote its
            file. Without it, return at once: calling :func:`run_sweep` again
            later skips the finished parts and those still running, and
            submits the rest.
        poll_s: How often, at first, to look at the locks of parts found running
            (backing off to 10 s).

    Returns:
        A :class:`Sweep`.

    Raises:
        FileExistsError: As :func:`pending_parts`.
        RuntimeError: With ``wait``, if a part failed (its error and the job's
            log folder are named), returned without writing its file, or is
            held by a job that cannot be checked from here.
    """
    sweep, failures = _run_rounds(
        parts,
        executor,
        ignore=ignore,
        check=check,
        overwrite=overwrite,
        reuse_other_versions=reuse_other_versions,
        wait=wait,
        poll_s=poll_s,
        rounds=2,
    )
    if failures:
        listed = "\n  ".join(failures)
        raise RuntimeError(
            f"{len(failures)} of {len(parts)} parts did not finish:\n  {listed}\n"
            f"Their logs are in {executor.folder}; fix the cause and call run_sweep again "
            "(finished parts are skipped)."
        )
    return sweep


def _run_rounds(
    parts: Sequence[Part],
    executor: Any,
    *,
    ignore: Collection[str],
    check: Callable[[Part], list[str]] | None,
    overwrite: bool,
    reuse_other_versions: bool,
    wait: bool,
    poll_s: float,
    rounds: int,
) -> tuple[Sweep, list[str]]:
    """One submission, waited for; the parts found running that end undone get ``rounds - 1``."""
    version = code_version()
    plan = plan_parts(
        parts,
        ignore=ignore,
        check=check,
        overwrite=overwrite,
        reuse_other_versions=reuse_other_versions,
        version=version,
    )
    submitted, jobs, raced = _submit(plan.todo, executor)
    running = dict(plan.running) | {p: "another submission" for p in raced}
    busy = {p.path for p in submitted} | set(running)
    skipped = tuple(p.path for p in parts if p.path not in busy)
    sweep = Sweep(skipped, tuple(p.path for p in submitted), tuple(jobs), tuple(running))
    if not wait:
        return sweep, []
    failures = []
    for part, job in zip(submitted, jobs, strict=True):
        try:
            job.result()
        except Exception as exc:  # the part's own error, re-raised by submitit
            failures.append(f"{part.path}: job {job.job_id} failed ({type(exc).__name__}: {exc})")
            continue
        if not part.path.exists():
            failures.append(f"{part.path}: job {job.job_id} returned without writing it")
        elif found := part_problems(part, ignore):
            failures += found
    unknown = wait_for_parts(running, poll_s=poll_s)
    for path, lock in unknown.items():
        failures.append(str(PartLockedError(path, lock.path, lock.holder, "unknown")))
    wanted = None if reuse_other_versions else version
    ended = [
        p
        for p in parts
        if p.path in running
        and p.path not in unknown
        and part_state(p.path, p.config, ignore=ignore, version=wanted).state != "done"
    ]
    if ended and rounds > 1:  # their job died, or they were run by other code: run them here
        again, more = _run_rounds(
            ended,
            executor,
            ignore=ignore,
            check=check,
            overwrite=False,
            reuse_other_versions=reuse_other_versions,
            wait=True,
            poll_s=poll_s,
            rounds=rounds - 1,
        )
        sweep = sweep._replace(
            submitted=sweep.submitted + again.submitted, jobs=sweep.jobs + again.jobs
        )
        failures += more
    elif ended:
        failures += [f"{p.path}: its earlier job ended without completing it" for p in ended]
    return sweep, failures
