"""What a benchmarked method is: the types the registry and the agreement check share.

:mod:`gradlens_bench.methods` fills the registry with :class:`Method` entries and
:mod:`gradlens_bench.agreement` writes their checks; both import this module,
neither imports the other's registry or checks through it, so the two stay
free of an import circle.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gradlens_bench.models import Family, Workload

__all__ = ["Check", "Method", "Output", "Prepare", "Run"]


@dataclass(frozen=True)
class Output:
    """What one probe ``run()`` returns; the fields that apply to the method are set.

    ``mean`` is the batch gradient, ``grads`` the per-example gradients with a
    leading ``example`` axis, ``dots``/``sq_norms`` the per-example inner
    products with the reference and squared norms, all keyed by parameter name.
    """

    mean: dict[str, Tensor] | None = None
    grads: dict[str, Tensor] | None = None
    dots: dict[str, Tensor] | None = None
    sq_norms: dict[str, Tensor] | None = None


Run = Callable[[], Any]
"""Does the measured work once."""

Prepare = Callable[[Workload], AbstractContextManager[Run]]
"""Sets a method up on a workload, yields its ``run`` and undoes the setup on exit."""

Check = Callable[["Method", Workload], float]
"""Runs the method once on the workload and returns its largest relative error."""


@dataclass(frozen=True)
class Method:
    """A benchmarked method.

    Attributes:
        name: Registry key, used in flags and result files.
        label: Human-readable name for tables and plots.
        family: The models it runs on (:data:`gradlens_bench.models.MODELS`).
        baseline: The method its time and memory are divided by.
        prepare: Setup context manager yielding ``run``.
        check: The agreement check; ``None`` for a reference cost that computes
            no gradient.
        requires: Module that must be importable (optional dependency), if any.
        max_batch: Largest batch worth timing (slow methods), if limited.
        materialises: Holds ``example x parameter`` gradient entries at once;
            used to skip batches that would not fit in memory.
        opt_in: Run only when named with ``--methods`` (the compiled steps:
            ``torch.compile`` takes a minute or more per case on a CPU).
    """

    name: str
    label: str
    family: Family
    baseline: str
    prepare: Prepare
    check: Check | None
    requires: str | None = None
    max_batch: int | None = None
    materialises: bool = False
    opt_in: bool = False

    def missing(self) -> str | None:
        """A note if the optional dependency is not installed, else ``None``."""
        if self.requires is None or importlib.util.find_spec(self.requires) is not None:
            return None
        return f"{self.requires} is not installed (pip install gradlens[bench])"
