"""Labelled records of a training run, written incrementally to netCDF4.

A :class:`Recorder` is declared once with its :class:`Variable` s and then fed
one call of :meth:`Recorder.log` per step. The first dim of every variable is
its *record dim* (``"step"``, or for example ``"example_step"`` for
per-example arrays stored every few steps): each record dim grows by one row,
at the logged step, whenever one of its variables is logged, and has an int64
coordinate of the same name holding those steps. Float variables of a record
dim that gets a row but no value read as NaN.

With a path, rows are buffered and appended every ``flush_every`` rows, at
the first :meth:`Recorder.log` once ``flush_seconds`` have passed since the
last flush (so a short or slow run is on disk too), and on
:meth:`Recorder.close`, to a private working file beside it
(``<path>.<host>-<pid>.writing``), which is closed between flushes; after each
flush a copy of it is renamed onto ``path`` (:mod:`gradlens.records.atomic`).
So ``path`` always holds a whole file as of some flush: readers in other
processes (:func:`open_run`, plain ``xarray.open_dataset``) never touch the
file being written and cannot disturb the writer, and a killed process leaves
a readable file holding every row up to its last flush. The file's global
attr ``complete`` is 0 until a clean :meth:`Recorder.close` sets it to 1
(:func:`is_complete`), so a cut-short file is never taken for a finished run.
Without a path,
everything stays in memory. Either way
:meth:`Recorder.dataset` returns the ``xarray.Dataset`` of everything logged,
and :func:`open_run` reads a file back. (Validation and layout live in the
private :mod:`gradlens.records.schema`, :mod:`gradlens.records.netcdf` and
:mod:`gradlens.records.dataset`.)

Example:
    >>> import torch
    >>> variables = {
    ...     "loss": Variable(("step",), "training loss"),
    ...     "accuracy": Variable(("step",), "test accuracy"),
    ...     "grad_norm": Variable(("step", "layer"), "gradient norm per layer"),
    ... }
    >>> rec = Recorder(None, variables, coords={"layer": ["net.0", "net.2"]})
    >>> rec.log(0, loss=2.5, accuracy=0.25, grad_norm=torch.tensor([1.0, 2.0]))
    >>> rec.log(1, loss=torch.tensor(1.5, requires_grad=True), grad_norm=[3.0, 4.0])
    >>> ds = rec.dataset()
    >>> dict(ds.sizes)
    {'step': 2, 'layer': 2}
    >>> ds["accuracy"].values.tolist()
    [0.25, nan]
    >>> ds["grad_norm"].sel(layer="net.2").values.tolist()
    [2.0, 4.0]
"""

from __future__ import annotations

import contextlib
import operator
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr

from gradlens.records.atomic import atomic_copy, atomic_rename, scratch_path
from gradlens.records.dataset import build_dataset
from gradlens.records.files import prepare_destination, write_error
from gradlens.records.netcdf import COMPLETE, append_netcdf, read_complete
from gradlens.records.provenance import RunProvenance, make_attrs
from gradlens.records.schema import (
    Variable,
    check_attrs,
    fit_shape,
    make_schema,
    no_rows,
    record_dims_hit,
    to_numpy,
)

__all__ = ["Recorder", "Variable", "is_complete", "open_run"]


def open_run(path: str | os.PathLike[str]) -> xr.Dataset:
    """Read a recorded run fully into memory; the file is closed afterwards.

    Args:
        path: A file written by :class:`Recorder`, complete or cut short.

    Returns:
        The dataset, with the same dims, coords and attrs as the in-memory one.
    """
    return xr.load_dataset(path, engine="netcdf4", decode_times=False, decode_timedelta=False)


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a finished run: a :class:`Recorder` closed it cleanly.

    A :class:`Recorder` writes the global attr ``complete = 0`` into every
    version of its file it publishes, and ``complete = 1`` only into the last
    one, at :meth:`Recorder.close` (``complete=True``, the default) after the
    final flush succeeded. ``with Recorder(...)`` closes it so only when its
    body finished without an exception. Reads the header only.

    Args:
        path: The file.

    Returns:
        ``True`` if its ``complete`` attr is the integer 1. ``False`` for a
        file still being written, cut short by a kill, closed after an
        exception or with ``close(complete=False)``, a missing file, a file
        that is not netCDF, and a file without the attr (written by gradlens
        before the marker existed, or by other tools): such a file may hold
        a whole run, but nothing says so.

    Raises:
        OSError: If the file exists but cannot be read (permissions, I/O).
    """
    return read_complete(path)


class _Pending(NamedTuple):
    """What a recorder has written and what it holds back.

    Attributes:
        offsets: Rows of each record dim in the working file; ``None`` before it exists.
        steps: The buffered steps of each record dim.
        rows: The buffered rows of each variable.

    Replaced in one assignment, so that an interruption sees the old or the new one.
    """

    offsets: dict[str, int] | None
    steps: dict[str, list[int]]
    rows: dict[str, list[np.ndarray | None]]


class Recorder:
    """Record labelled rows of a training run, in memory or into a netCDF4 file.

    Args:
        path: The netCDF4 file to write, or ``None`` to keep every row in memory.
        variables: The variables to record, by name.
        coords: Labels of non-record dims, for example ``{"layer": ["net.0", "net.2"]}``;
            a non-record dim without labels takes its size from the first value logged.
        attrs: Extra dataset attrs (str, int or float), merged over
            ``make_attrs(config, provenance=provenance)``.
        config: The run's config (a dataclass or Mapping), stored as JSON in the attrs.
        provenance: The run's :func:`~gradlens.records.run_provenance` snapshot, when
            the run started before the recorder; by default it is taken here,
            so the git commit and ``git_dirty`` in the file are those of the
            code at construction, not at a later flush.
        flush_every: With a path, append the buffered rows to the file whenever
            a record dim has this many. Each flush also copies the whole file
            onto ``path`` (a few ms for a few MB); for files of hundreds of MB
            raise it.
        flush_seconds: With a path, also flush at the first :meth:`log` that
            comes this many seconds after the previous flush (or the
            construction), however few rows are buffered; ``None`` flushes on
            ``flush_every`` alone. Checked only inside :meth:`log`: there is
            no background thread.
        clock: The clock ``flush_seconds`` is measured on, in seconds
            (:func:`time.monotonic`; tests pass a fake one).
        overwrite: Replace an existing file at ``path``; without it that is an error.

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is not set.
        FileNotFoundError: If the folder of ``path`` does not exist.
        PermissionError: If the folder of ``path`` cannot be written to.
        ValueError: If ``flush_every`` or ``flush_seconds`` is not positive, or a
            name, label or attr netCDF would refuse or alter (``/`` or NUL in a
            name, NUL in a text attr, ...), or a reserved attr name (``complete``,
            ``coordinates``, ``_*``).
        TypeError: For an attr that is not str, int or float.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        variables: Mapping[str, Variable],
        *,
        coords: Mapping[str, Sequence[Any]] | None = None,
        attrs: Mapping[str, str | int | float] | None = None,
        config: object | None = None,
        provenance: RunProvenance | None = None,
        flush_every: int = 50,
        flush_seconds: float | None = 30.0,
        clock: Callable[[], float] = time.monotonic,
        overwrite: bool = False,
    ) -> None:
        if isinstance(flush_every, bool) or operator.index(flush_every) < 1:
            raise ValueError(f"flush_every must be at least 1 row, got {flush_every}.")
        if flush_seconds is not None and not flush_seconds > 0:
            raise ValueError(
                f"flush_seconds must be a positive number of seconds or None, got {flush_seconds}."
            )
        check_attrs(attrs or {}, reserved=(COMPLETE, "coordinates"))
        self._schema = make_schema(variables, coords or {})
        self._sizes = {dim: len(labels) for dim, labels in self._schema.coords.items()}
        # Without a snapshot, make_attrs takes one now: construction is the run's start.
        self._attrs = {**make_attrs(config, provenance=provenance), **(attrs or {})}
        check_attrs(self._attrs, reserved=(COMPLETE, "coordinates"))
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._clock = clock
        self._path = None if path is None else Path(path)
        if self._path is not None:
            prepare_destination(self._path, overwrite)
            self._writing = scratch_path(self._path, ".writing")
        self._closed = False
        self._complete = False
        self._last_step: dict[str, int] = {}
        self._pending = _Pending(None, *no_rows(self._schema))
        self._flushed_at = clock()

    @property
    def path(self) -> Path | None:
        """The file written, or ``None`` in memory."""
        return self._path

    def log(self, step: int, **values: float | int | torch.Tensor | np.ndarray) -> None:
        """Record values at a training step.

        Each value becomes the row at ``step`` of its variable's record dim;
        other float variables of that record dim read NaN in that row.

        Args:
            step: The training step; must exceed the last step of every record
                dim that gets a row.
            **values: By variable name, a number or an array shaped like the
                variable's non-record dims; tensors may be on any device and
                require grad.

        Raises:
            ValueError: For an unknown name, a step that does not increase, a
                shape that disagrees with earlier values or coords, a missing
                int variable, or a closed recorder.
        """
        if self._closed:
            raise ValueError("this Recorder is closed; create a new one to record more.")
        step = operator.index(step)
        if not -(2**63) <= step < 2**63:
            raise ValueError(f"step {step} does not fit the int64 step coordinate.")
        if not values:
            raise ValueError(f"log({step}) got no values; pass them as name=value.")
        dims = record_dims_hit(self._schema, self._last_step, step, values.keys())
        variables = self._schema.variables
        arrays = {name: to_numpy(name, variables[name], v) for name, v in values.items()}
        sizes = self._sizes
        for name, array in arrays.items():
            sizes = fit_shape(name, variables[name], array, sizes)
        self._sizes = sizes
        pending = self._pending
        lengths = {dim: len(pending.steps[dim]) for dim in dims}
        try:
            for dim in dims:
                pending.steps[dim].append(step)
                for name, var in variables.items():
                    if var.dims[0] == dim:
                        pending.rows[name].append(arrays.get(name))
        except BaseException:  # interrupted: drop the half-added row
            for dim, length in lengths.items():
                del pending.steps[dim][length:]
                for name, var in variables.items():
                    if var.dims[0] == dim:
                        del pending.rows[name][length:]
            raise
        self._last_step.update(dict.fromkeys(dims, step))
        if self._path is not None and self._due():
            self.flush()

    def _due(self) -> bool:
        """Whether a buffered row count or the time since the last flush calls for a flush."""
        if max(map(len, self._pending.steps.values())) >= self._flush_every:
            return True
        seconds = self._flush_seconds
        return seconds is not None and self._clock() - self._flushed_at >= seconds

    def flush(self) -> None:
        """Write the buffered rows to the file (creating it the first time).

        A no-op in memory and once closed. Interrupted (``KeyboardInterrupt``),
        it leaves ``path`` as of the previous flush and keeps the rows
        buffered: the next flush or :meth:`close` writes them once.

        Raises:
            RecordWriteError: If the rows could not be written (a full disk,
                say). The recorder is then closed and ``path`` still holds
                every row up to the previous flush.
        """
        if not self._closed:
            self._flush(final=False, complete=False)

    def close(self, *, complete: bool = True) -> None:
        """Flush and stop recording; calling it again does nothing.

        Args:
            complete: Mark the file complete (its ``complete`` attr 1, see
                :func:`is_complete`) once the final flush succeeded; pass
                ``False`` for a run that stopped early. Leaving a ``with``
                block through an exception closes with ``complete=False``.

        Raises:
            RecordWriteError: As :meth:`flush`; the file is then not complete.
        """
        if not self._closed:
            self._closed = True  # a failed final flush is not tried again
            self._flush(final=True, complete=complete)
            self._complete = complete

    def _flush(self, *, final: bool, complete: bool) -> None:
        """Write the rows into the working file, then publish it onto the path.

        The working file is copied onto the path, or renamed onto it if ``final``.
        """
        path, pending = self._path, self._pending
        has_rows = any(pending.steps.values())
        if path is None or (pending.offsets is not None and not has_rows and not final):
            return
        described = ", ".join(f"{dim} {s[0]}..{s[-1]}" for dim, s in pending.steps.items() if s)
        described = f"the rows of {described}" if described else "the file's header"
        if has_rows or pending.offsets is None or (final and complete):
            try:
                append_netcdf(
                    self._writing,
                    self._schema,
                    self._sizes,
                    pending.offsets,
                    pending.steps,
                    pending.rows,
                    self._attrs,
                    complete=final and complete,
                )
            except (OSError, RuntimeError) as exc:
                self._fail(described, self._writing, exc)
            start = pending.offsets or dict.fromkeys(pending.steps, 0)
            offsets = {dim: start[dim] + len(steps) for dim, steps in pending.steps.items()}
            self._pending = _Pending(offsets, *no_rows(self._schema))
            self._flushed_at = self._clock()
        try:
            if final:
                atomic_rename(self._writing, path)
            else:
                atomic_copy(self._writing, path, clean=False)
        except OSError as exc:
            self._fail(described, path, exc)

    def _fail(self, rows: str, where: Path, exc: BaseException) -> None:
        """Close the recorder, drop the working file and raise a :class:`RecordWriteError`."""
        self._closed = True
        self._pending = _Pending(None, *no_rows(self._schema))
        path = self._path
        assert path is not None
        size = max((p.stat().st_size for p in (path, self._writing) if p.exists()), default=0)
        with contextlib.suppress(OSError):
            self._writing.unlink()
        raise write_error(path, rows, where, exc, size) from exc

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(complete=exc_type is None)

    def dataset(self) -> xr.Dataset:
        """Return everything logged so far; with a path, flush and read the file back.

        Its ``complete`` attr is 1 once the recorder was closed with ``complete=True``.
        """
        if self._path is not None:
            self.flush()
            return open_run(self._path)
        pending = self._pending
        attrs = {**self._attrs, COMPLETE: int(self._complete)}
        return build_dataset(self._schema, self._sizes, pending.steps, pending.rows, attrs)
