"""Lock files: a part that is submitted and not finished is recorded beside its file (private).

``<path>.lock`` (JSON) is created, atomically and only if absent, by whoever
is about to run the part (the process that submits it, or runs it itself),
before the job exists. It holds a random token, the cluster, the submitting
process (host, boot id, pid, start time), then the job id once submitit gave
one, then the process running the part once the job starts (the job's
wrapper checks the token first and refuses to run a part whose lock was taken
over). The job removes the lock when the part returns or raises; a job killed
on the spot leaves it, and the lock is then *stale*:

- the process running the part is gone (same host and boot: no such pid, a
  zombie, or another process with that pid started at another time);
- before the job started: a local job's controller process is gone, or a SLURM
  job id is no longer pending or running (``squeue``), or, with no job id yet,
  the submitting process is gone.

A process on another host, with no SLURM job id to ask about, cannot be
checked: such a lock counts as held. Every read and rewrite of a lock holds
``flock`` on it, so two drivers that find one stale lock replace it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple

__all__ = [
    "Lock",
    "PartLockedError",
    "adopt",
    "claim",
    "lock_path",
    "note_job",
    "read_lock",
    "release",
    "this_process",
]

State = Literal["running", "gone", "unknown"]

SLURM_ACTIVE = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
     "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
)  # fmt: skip
"""``squeue`` states of a job that may still run (or write) its part."""


class PartLockedError(RuntimeError):
    """A part is held by a job that is running, or that cannot be checked from here.

    Attributes:
        path: The part's file.
        lock: Its lock file.
    """

    def __init__(self, path: Path, lock: Path, holder: str, state: State) -> None:
        self.path, self.lock = path, lock
        why = "is being run by" if state == "running" else "is held by"
        fix = "" if state == "running" else ", or delete the lock if you know that job is gone"
        super().__init__(f"{path} {why} {holder} (lock {lock}); wait for it to finish{fix}.")


class Lock(NamedTuple):
    """A part's lock file and what it says.

    Attributes:
        path: The lock file.
        record: Its contents (``None`` if unreadable: written by a process killed mid-write).
        state: ``"running"``, ``"gone"`` (stale) or ``"unknown"`` (cannot be checked here).
        holder: Who holds it, in words.
    """

    path: Path
    record: dict[str, Any] | None
    state: State
    holder: str


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of the part file ``path``: ``<path>.lock``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first), ``[]`` without /proc, None if no pid."""
    if not Path("/proc/self/stat").exists():
        return []
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def this_process(pid: int | None = None) -> dict[str, Any]:
    """Who a process is, on any host: host name, boot id, pid and start time (clock ticks)."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    start = int(stat[19]) if stat else None
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": start}


def _process_state(process: Mapping[str, Any]) -> State:
    if process.get("host") != socket.gethostname():
        return "unknown"
    boot = _boot_id()
    if process.get("boot") and boot and process["boot"] != boot:
        return "gone"
    pid = int(process["pid"])
    stat = _proc_stat(pid)
    if stat is None or (stat and stat[0] in "ZXx"):
        return "gone"
    if stat and process.get("start") is not None and int(stat[19]) != int(process["start"]):
        return "gone"  # the pid was reused
    if not stat:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass
    return "running"


def _slurm_state(job_id: str) -> State:
    try:
        done = subprocess.run(
            ["squeue", "--noheader", "--format=%T", f"--jobs={job_id}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if done.returncode != 0:
        return "gone" if "invalid job id" in done.stderr.lower() else "unknown"
    return "running" if set(done.stdout.split()) & SLURM_ACTIVE else "gone"


def _assess(record: Mapping[str, Any] | None) -> tuple[State, str]:
    """Whether the holder of a lock may still write its part, and who it is."""
    if record is None:
        return "gone", "nobody (the lock is unreadable: its writer died mid-write)"
    cluster, job_id, job = record.get("cluster"), record.get("job_id"), record.get("job")
    driver = record.get("driver") or {}
    where = job or driver
    article = "an" if str(cluster)[:1] in "aeiou" else "a"
    holder = f"{cluster} job {job_id}" if job_id else f"{article} {cluster} run"
    holder += f" (pid {where.get('pid')} on {where.get('host')})"
    if job:
        state = _process_state(job)
        if state == "unknown" and cluster == "slurm" and job_id:
            state = _slurm_state(str(job_id))
    elif job_id and cluster == "slurm":
        state = _slurm_state(str(job_id))
    elif job_id and cluster == "local":  # its controller, a child of the driver
        state = _process_state({**driver, "pid": int(job_id), "start": record.get("job_start")})
    else:  # not submitted yet, or run by the driver itself (inline, debug)
        state = _process_state(driver)
    return state, holder


@contextlib.contextmanager
def _opened(lock: Path, *, exclusive: bool) -> Iterator[int | None]:
    """The lock file's descriptor under ``flock``, or ``None`` when there is no lock."""
    for _ in range(1000):
        try:
            fd = os.open(lock, os.O_RDWR if exclusive else os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else it was removed (and maybe re-created) while we waited
                yield fd
                return
        finally:
            os.close(fd)
    raise RuntimeError(f"{lock} keeps being replaced; is something deleting lock files?")


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    try:
        record = json.loads(b"".join(chunks))
    except ValueError:
        return None
    return record if isinstance(record, dict) and "token" in record else None


def _write(fd: int, record: Mapping[str, Any]) -> None:
    data = json.dumps(record, indent=1).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def read_lock(path: str | os.PathLike[str]) -> Lock | None:
    """The lock of the part file ``path`` and whether its holder may still run, or ``None``."""
    lock = lock_path(path)
    with _opened(lock, exclusive=False) as fd:
        if fd is None:
            return None
        record = _read(fd)
        return Lock(lock, record, *_assess(record))


def _create(lock: Path, record: Mapping[str, Any]) -> bool:
    """Create ``lock`` holding ``record``, whole, if it does not exist (a hard link is atomic)."""
    tmp = lock.with_name(f".{lock.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as file:
        json.dump(record, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    try:
        os.link(tmp, lock)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def claim(
    path: str | os.PathLike[str],
    *,
    cluster: str,
    folder: str | os.PathLike[str] | None = None,
    job: Mapping[str, Any] | None = None,
) -> str:
    """Lock the part file ``path`` before running it; replace a stale lock.

    Args:
        path: The part's file.
        cluster: Where it runs: ``"local"``, ``"slurm"``, ``"debug"``, ``"inline"``, ...
        folder: The jobs' log folder, recorded for the reader.
        job: The process that runs the part, when it is known now (this one, inline).

    Returns:
        The claim's token, for :func:`note_job`, :func:`adopt` and :func:`release`.

    Raises:
        PartLockedError: If the part is held by a job that runs or cannot be checked.
    """
    path = Path(path)
    lock = lock_path(path)
    token = uuid.uuid4().hex
    record = {
        "token": token,
        "claimed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cluster": cluster,
        "folder": None if folder is None else str(folder),
        "driver": this_process(),
        "job_id": None,
        "job_start": None,
        "job": None if job is None else dict(job),
    }
    lock.parent.mkdir(parents=True, exist_ok=True)  # where the part will be written
    for _ in range(100):
        if _create(lock, record):
            return token
        with _opened(lock, exclusive=True) as fd:
            if fd is None:
                continue  # released meanwhile: create it again
            state, holder = _assess(_read(fd))
            if state != "gone":
                raise PartLockedError(path, lock, holder, state)
            _write(fd, record)
            return token
    raise RuntimeError(f"could not lock {path}: {lock} keeps appearing and disappearing.")


def _update(path: Path, token: str, **changes: Any) -> bool:
    with _opened(lock_path(path), exclusive=True) as fd:
        if fd is None:
            return False
        record = _read(fd)
        if record is None or record.get("token") != token:
            return False
        _write(fd, record | changes)
        return True


def note_job(path: Path, token: str, job_id: str, cluster: str) -> None:
    """Record the job id submitit gave the part's job (and a local job's controller start)."""
    changes: dict[str, Any] = {"job_id": str(job_id)}
    if cluster == "local" and str(job_id).isdigit():
        changes["job_start"] = this_process(int(job_id))["start"]
    _update(path, token, **changes)


def adopt(path: Path, token: str, job_id: str | None) -> bool:
    """In the job: record this process as the part's runner, if the lock is still this claim's."""
    with _opened(lock_path(path), exclusive=True) as fd:
        record = None if fd is None else _read(fd)
        if fd is None or record is None or record.get("token") != token:
            return False
        record["job"] = this_process()
        record["job_id"] = record.get("job_id") or job_id
        _write(fd, record)
        return True


def release(path: Path, token: str) -> None:
    """Remove the part's lock if it is still this claim's."""
    lock = lock_path(path)
    with _opened(lock, exclusive=True) as fd:
        if fd is not None and (_read(fd) or {}).get("token") == token:
            lock.unlink()
