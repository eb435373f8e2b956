"""Writing a file so that readers and crashes only ever see a whole version of it (private).

:func:`atomic_write` writes to a temporary name in the destination's folder
and renames it onto the destination with :func:`os.replace`. The rename is
atomic on POSIX file systems: a reader opens either the previous version or
the new one, never half a file, and a process killed at any moment leaves
the previous version in place (plus, at worst, a hidden temporary file,
``.<name>.<host>-<pid>.<random>.tmp``). A reader that already holds the
previous version open keeps reading it. The new version is flushed to disk
(``fsync``) before the rename, so the file also survives a power cut as one
version or the other.

The new version gets the mode a plain ``open(path, "w")`` would give it,
``0o666`` less the umask (not ``tempfile``'s private ``0o600``), so that other
accounts sharing a results folder can read it.

Temporary files name the host (a short hash) and the process that made
them, so :func:`remove_stale` can delete those whose process is gone, and only
those: :func:`atomic_write` calls it for its destination, and a
:class:`~gradlens.records.Recorder` for its path when it starts.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = atomic_write(folder / "summary.md", lambda tmp: tmp.write_text("v1"))
    >>> (folder / "summary.md").read_text()
    'v1'
    >>> sorted(p.name for p in folder.iterdir())  # no temporary file is left
    ['summary.md']
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_copy",
    "atomic_rename",
    "atomic_write",
    "atomic_write_text",
    "remove_stale",
    "scratch_path",
]


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], object], *, clean: bool = True
) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file, then rename it into place.

    Args:
        path: The destination; its folder must exist.
        write: Writes the whole new version to the path it is given (which
            exists, empty, so writers that refuse to clobber need their
            clobber option).
        clean: First remove the temporary files of ``path`` left by
            processes of this host that are gone (:func:`remove_stale`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: From ``write``, ``fsync`` or the rename; ``path`` is then
            unchanged and the temporary file removed.
    """
    path = Path(path)
    if clean:
        remove_stale(path, ".tmp")
    tmp = path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{secrets.token_hex(8)}.tmp")
    try:  # one block, so that an interruption anywhere after the open removes the file
        # mode 0o666 less the umask, as open(tmp, "w") would make it (the name of this host,
        # process and 64 random bits is never another's: O_EXCL only makes sure)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_copy(
    source: str | os.PathLike[str], path: str | os.PathLike[str], *, clean: bool = True
) -> Path:
    """Copy ``source`` onto ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp), clean=clean)


def atomic_rename(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Flush ``source`` to disk and rename it onto ``path`` (same file system)."""
    _fsync(Path(source))
    os.replace(source, path)
    _fsync_folder(Path(path).parent)
    return Path(path)


def scratch_path(path: str | os.PathLike[str], suffix: str, *, hidden: bool = False) -> Path:
    """A name beside ``path`` for this process's scratch copy of it.

    ``<name>.<host>-<pid><suffix>`` (with a leading ``.`` if ``hidden``),
    where ``<host>`` is 8 hex digits of a hash of the host name: the pattern
    :func:`remove_stale` recognises. Computed at each call, so a forked child
    gets its own.
    """
    path = Path(path)
    return path.with_name(f"{'.' if hidden else ''}{path.name}.{_host()}-{os.getpid()}{suffix}")


def remove_stale(path: str | os.PathLike[str], suffix: str) -> list[Path]:
    """Delete the scratch files of ``path`` whose process is gone.

    Only files beside ``path`` named by :func:`scratch_path` (or by
    :func:`atomic_write`'s temporary files) for ``path`` with ``suffix``,
    made on this host by a process that no longer runs (``os.kill(pid, 0)``
    finds none). Files of live processes, of other hosts (a shared network
    folder), of other names, or in the pid-less pattern of older gradlens
    versions are left alone, and so is everything on Windows, where a
    process cannot be probed without a risk of killing it.

    Returns:
        The files deleted.
    """
    path = Path(path)
    if os.name == "nt":
        return []
    pattern = re.compile(
        rf"\.?{re.escape(path.name)}\.(?P<host>[0-9a-f]{{8}})-(?P<pid>[0-9]+)"
        rf"(\.[a-z0-9_]+)?{re.escape(suffix)}"
    )
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match["host"] != _host() or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _host() -> str:
    """Eight hex digits naming this host in scratch file names."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (ours, or another account's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another account's process, or a pid we cannot probe: keep its files
    return True


def _fsync(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; some platforms cannot open a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
