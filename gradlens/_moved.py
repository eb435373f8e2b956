"""Old import paths of modules that moved into the stage folders, for one release.

``import gradlens.ghost`` (say) still works: it warns (``DeprecationWarning``)
and gives the module at its new path, ``gradlens.probes.ghost``. docs/api.md
lists every move. Private modules (``gradlens._ghost_plan``, ...) moved
without an alias.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED: dict[str, str] = {
    "gradlens.ghost": "gradlens.probes.ghost",
    "gradlens.per_example": "gradlens.probes.vmap",
    "gradlens.gradops": "gradlens.alignment.gradops",
    "gradlens.layerstats": "gradlens.alignment.layerstats",
    "gradlens.losses": "gradlens.training.losses",
    "gradlens.liminal": "gradlens.training.liminal",
    "gradlens.recording": "gradlens.records.recorder",
    "gradlens.provenance": "gradlens.records.provenance",
    "gradlens.plotting": "gradlens.figures.plots",
}
"""Old module path -> new module path."""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Find an old path and load it as the module at its new path, with a warning."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        del path, target
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path goes in the next "
            "release; docs/api.md lists every move).",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        del module  # the new module is already executed


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
