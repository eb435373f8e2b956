"""Factored ("ghost") forms: one file per kind of operation, registered in one table.

A :class:`Form` says how one operation that reads parameters linearly gives
each example's inner products with references and squared norms from its
input and output gradient (:mod:`gradlens.probes.forms.base`). The forms here:
``F.linear`` and HF ``Conv1D``'s ``torch.addmm`` (:mod:`~gradlens.probes.forms.linear`),
convolutions (:mod:`~gradlens.probes.forms.conv`), ``F.embedding``
(:mod:`~gradlens.probes.forms.embedding`) and the normalisations
(:mod:`~gradlens.probes.forms.norm`); a parameter read by several calls
combines them (:mod:`~gradlens.probes.forms.shared`). A parameter broadcast
over the examples (added, multiplied, expanded, or read by ``F.linear`` after
operations that do not see the examples) takes the broadcast form
(:mod:`~gradlens.probes.forms.broadcast`, planned by
:mod:`~gradlens.probes.forms.flows`); :mod:`~gradlens.probes.forms.cost` models
what each path costs. :func:`register_form`
adds a form for another function (docs/contributing.md).
"""

from __future__ import annotations

from gradlens.probes.forms.base import Call, Form, Layout, argument, from_materialised, to_examples
from gradlens.probes.forms.registry import FORMS, register_form

__all__ = [
    "FORMS",
    "Call",
    "Form",
    "Layout",
    "argument",
    "from_materialised",
    "register_form",
    "to_examples",
]
