"""Runs as labelled ``xarray`` datasets, written incrementally to netCDF4.

- :mod:`gradlens.records.recorder`: :class:`Recorder`, :class:`Variable`, :func:`open_run`,
  :func:`is_complete`;
- :mod:`gradlens.records.schema`, :mod:`~gradlens.records.netcdf`,
  :mod:`~gradlens.records.dataset`, :mod:`~gradlens.records.atomic`,
  :mod:`~gradlens.records.files`, :mod:`~gradlens.records.interrupts`: validation, the file
  writer, the dataset builder, atomic publishing, the files around a path and Ctrl-C held
  during a write behind it;
- :mod:`gradlens.records.provenance`: what made a run (versions, commit, config).

What a probed step records is declared in :mod:`gradlens.training.records`.
"""

from __future__ import annotations

from gradlens.records.provenance import (
    RunProvenance,
    config_from_attrs,
    make_attrs,
    run_provenance,
)
from gradlens.records.recorder import Recorder, Variable, is_complete, open_run

__all__ = [
    "Recorder",
    "RunProvenance",
    "Variable",
    "config_from_attrs",
    "is_complete",
    "make_attrs",
    "open_run",
    "run_provenance",
]
