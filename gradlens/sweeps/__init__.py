"""Run a sweep's independent parts on submitit: locally, or as a SLURM job array.

A sweep is a list of :class:`Part` s. Each part is a picklable callable and
its argument, ``fn(arg)``, that writes one run file, ``path``, recorded with
its config (a :class:`~gradlens.Recorder` given ``config=`` stores it as
JSON in the file's attrs, with the code version: ``gradlens_version`` and
``git_commit``). The contract, the same as the MNIST experiment's:

- **complete**: a part marks its file complete when it is whole (global attr
  ``complete = 1``, :func:`is_complete`: a :class:`~gradlens.Recorder` sets it
  when it closes cleanly; :func:`mark_complete` for a file written without
  one), and writes it to a temporary name renamed onto
  ``path``, or to ``path`` itself; a file not marked complete (cut short) is
  run again;
- **done**: ``path`` is complete, stores the part's ``config`` in every field
  but ``ignore`` (the fields that only choose which parts run or where, not
  what a part holds), and was computed by this code version
  (:class:`CodeVersion`), unless ``reuse_other_versions``: a part of another
  version is run again by default;
- **refused**: a file at ``path`` written with another config, or unreadable,
  is never silently replaced: :func:`pending_parts` refuses it unless ``overwrite``;
- **locked**: a part submitted and not finished has a lock file,
  ``<path>.lock`` (JSON: who submitted it, the job id, the process that runs
  it), made before the job is submitted and removed by the job when the part
  returns or raises. A part whose lock is held by a live job is never
  submitted again (:func:`run_sweep` waits for it instead); a lock whose job
  is gone (the pid, or the SLURM job, no longer exists) is *stale* and is
  taken over. So resubmitting while parts run, or after the submitting
  process was killed, never starts a second job on one file.

:func:`run_sweep` submits the parts that are neither done nor running to a
submitit executor in one batch (on SLURM, one job array), waits for them and
for the parts found running, and checks that each wrote its file. Merging the
part files into one dataset is the caller's. :func:`make_executor` builds the
executor: ``cluster="local"`` (default) runs every part as a subprocess of
this machine, ``"slurm"`` submits a job array, ``"debug"`` runs them one after
another in this process. :func:`hold_parts` locks parts that a process runs
itself. submitit is an optional dependency (``pip install gradlens[sweep]``).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> part = Part(folder / "seed0.nc", print, "hello", {"seed": 0})
    >>> [p.path.name for p in pending_parts([part])]  # nothing written yet
    ['seed0.nc']
"""

from __future__ import annotations

from gradlens.sweeps._files import (
    CodeVersion,
    PartState,
    code_version,
    file_version,
    is_complete,
    mark_complete,
    part_state,
    stored_config,
)
from gradlens.sweeps._holding import hold_parts, wait_for_parts
from gradlens.sweeps._locks import Lock, PartLockedError, lock_path, read_lock
from gradlens.sweeps._parts import Part, part_problems, pending_parts
from gradlens.sweeps._run import Sweep, make_executor, run_part_job, run_sweep

__all__ = [
    "CodeVersion",
    "Lock",
    "Part",
    "PartLockedError",
    "PartState",
    "Sweep",
    "code_version",
    "file_version",
    "hold_parts",
    "is_complete",
    "lock_path",
    "make_executor",
    "mark_complete",
    "part_problems",
    "part_state",
    "pending_parts",
    "read_lock",
    "run_part_job",
    "run_sweep",
    "stored_config",
    "wait_for_parts",
]
