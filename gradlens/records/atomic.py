"""Writing a file so that readers and crashes only ever see a whole version of it (private).

:func:`atomic_write` writes to a temporary name in the destination's folder
and renames it onto the destination with :func:`os.replace`. The rename is
atomic on POSIX file systems: a reader opens either the previous version or
the new one, never half a file, and a process killed at any moment leaves
the previous version in place (plus, at worst, a hidden ``.<name>.*.tmp``
file). A reader that already holds the previous version open keeps reading
it. The new version is flushed to disk (``fsync``) before the rename, so the
file also survives a power cut as one version or the other.

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
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_copy", "atomic_rename", "atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file, then rename it into place.

    Args:
        path: The destination; its folder must exist.
        write: Writes the whole new version to the path it is given (which
            exists, empty, so writers that refuse to clobber need their
            clobber option).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: From ``write``, ``fsync`` or the rename; ``path`` is then
            unchanged and the temporary file removed.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
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


def atomic_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Copy ``source`` onto ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def atomic_rename(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Flush ``source`` to disk and rename it onto ``path`` (same file system)."""
    _fsync(Path(source))
    os.replace(source, path)
    _fsync_folder(Path(path).parent)
    return Path(path)


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
