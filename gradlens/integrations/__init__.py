"""gradlens inside the trainers people use: ``transformers``/TRL and Lightning.

- :mod:`gradlens.integrations.probe`: :class:`TrainerProbe`, the probed step around
  another trainer's optimizer step (framework-neutral);
- :mod:`gradlens.integrations.mode`: the step body's mode in a trainer's process
  (``g_t`` taken once per optimizer step);
- :mod:`gradlens.integrations.examples`: the per-example values of a step's micro-batches
  and the check that they make up the trainer's ``.grad``;
- :mod:`gradlens.integrations.hf`: a ``transformers.TrainerCallback`` and a ``Trainer``
  mixin with per-example values (extra ``hf``);
- :mod:`gradlens.integrations.lightning`: a Lightning ``Callback`` (extra ``lightning``).

The two trainer modules import their framework; this package imports neither.
"""

from __future__ import annotations

from gradlens.integrations.probe import LOGGED, TrainerProbe

__all__ = ["LOGGED", "TrainerProbe"]
