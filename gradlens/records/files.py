"""The files around a :class:`~gradlens.records.Recorder`'s path (private).

:func:`prepare_destination` checks the path when a recorder starts and
removes what killed recorders of it left (never a live one's files);
:func:`write_error` is the :class:`~gradlens.errors.RecordWriteError` of a
flush that failed, naming the free space, the likely cause and what is kept.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

from gradlens.errors import RecordWriteError
from gradlens.records.atomic import remove_stale


def write_error(
    path: Path, rows: str, where: Path, exc: BaseException, size: int
) -> RecordWriteError:
    """The error of a failed flush, once its working file is removed.

    netCDF reports a full disk as "NetCDF: HDF error" (no errno), the kernel
    as ENOSPC, some file systems as "Permission denied"; so the message names
    the free space left on ``path``'s file system and guesses the likely cause
    from the errno and that space.

    Args:
        path: The recorder's file.
        rows: Which rows were being written ("the rows of step 10..14").
        where: The file that could not be written (the working file or ``path``).
        exc: The cause.
        size: The size of the recorder's file, in bytes.

    Returns:
        The error to raise, from ``exc``.
    """
    mib = 2**20
    try:
        free: int | None = shutil.disk_usage(path.parent).free
        space = f"{free / mib:.1f} MiB free there (after removing the working file)"
    except OSError:
        free, space = None, "its free space unknown"
    code = getattr(exc, "errno", None)
    full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if code in full or (free is not None and free < 2 * size + 64 * mib):
        likely = (
            "the disk (or your quota) is likely full, as each flush needs room for about "
            f"two more copies of the {size / mib:.1f} MiB file"
        )
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        likely = "the folder or file is likely no longer writable (permissions, a read-only mount)"
    else:
        likely = (
            "the disk is not full, so the likely cause is a quota, a file system that went "
            "away (a network mount) or changed permissions"
        )
    kept = (
        f"{path} still holds every row up to the previous flush and is kept"
        if path.exists()
        else f"{path} was not created (no flush had finished)"
    )
    return RecordWriteError(
        f"could not write {rows} to {where} ({type(exc).__name__}: {exc}). {space}: {likely}. "
        f"{kept}; this Recorder is closed and the rows not yet flushed are lost. Free disk "
        "space or fix the cause, then record to a new path or with overwrite=True.",
        errno=code if isinstance(code, int) and code > 0 else None,
        filename=str(where),
    )


def prepare_destination(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` without ``overwrite`` or a missing folder; clear old files.

    Removes the scratch files (working file, temporary copies) of ``path`` left
    by processes of this host that are gone, never those of a live one
    (:func:`~gradlens.records.atomic.remove_stale`).

    Args:
        path: The file a recorder is about to write.
        overwrite: Remove an existing ``path``; without it that is an error.

    Raises:
        FileNotFoundError: If the folder of ``path`` does not exist.
        IsADirectoryError: If ``path`` is a folder.
        PermissionError: If no file can be created in the folder.
        FileExistsError: If ``path`` exists and ``overwrite`` is not set.
    """
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"the folder {path.parent} of {path.name} does not exist; create it first "
            "(Path.mkdir(parents=True)) or choose another path."
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder; give the Recorder a file in it, such as {path / 'run.nc'}."
        )
    try:  # a folder that cannot be written would fail only at the first flush
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        raise PermissionError(
            f"cannot create files in {path.parent} ({exc.strerror or exc}); choose a folder "
            f"you can write to for {path.name}."
        ) from exc
    if path.exists():
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; pass overwrite=True to replace it, or choose another path."
            )
        path.unlink()
    remove_stale(path, ".writing")
    remove_stale(path, ".tmp")
    # the pid-less working file of gradlens 0.2.0 and before, which had one name per path
    path.with_name(path.name + ".writing").unlink(missing_ok=True)
