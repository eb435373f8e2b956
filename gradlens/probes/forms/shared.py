"""Exact dots and norms of a parameter read by several calls (private).

A parameter read by several registered calls (a tied embedding and LM head,
one ``nn.Linear`` applied twice, two modules holding one weight) has
per-example gradient ``G_i = sum_c G_i^c``, the sum over its calls. The dots
add. The squared norm needs the cross terms,
``||G_i||^2 = sum_{c, c'} <G_i^c, G_i^c'>``, and these have a factored form
whenever each ``G_i^c`` is a sum of outer products ``sum_t u_t v_t^T``
(:class:`Outer`): ``<G^c, G^c'> = sum_{t, s} (u_t . u'_s)(v_t . v'_s)``. For
``F.linear`` ``u`` is the output gradient and ``v`` the input; for HF
``Conv1D`` the other way round; for ``F.embedding`` ``u`` is the one-hot id
(kept as ids: ``u_t . u'_s`` is ``[id_t == id'_s]`` or ``u'_s[id_t]``) and ``v``
the output gradient. Parameters with few entries per example (biases, the
affine parameters of normalisations) are built per example
(:class:`Materialised`) and summed. Calls of other kinds (convolutions) are
not combined: the plan sends such a parameter to ``vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.probes.forms.base import from_materialised

__all__ = ["Materialised", "Outer", "Part", "combine"]


class Outer(NamedTuple):
    """``G_i = sum_t u_it v_it^T`` with ``u`` dense ``(example, token, P)`` or one-hot ids."""

    u: Tensor | None
    ids: Tensor | None
    v: Tensor


class Materialised(NamedTuple):
    """Per-example gradients, ``(example, *param)``."""

    grads: Tensor


Part = Outer | Materialised


def combine(parts: list[Part], references: Tensor) -> tuple[Tensor, Tensor]:
    """Dots ``(example, reference)`` and squared norms ``(example,)`` of the summed parts.

    Args:
        parts: One per call reading the parameter, all :class:`Outer` or all
            :class:`Materialised` (the plan checks this).
        references: Shape ``(reference, *param)``.
    """
    if all(isinstance(p, Materialised) for p in parts):
        return from_materialised(torch.stack([p.grads for p in parts]).sum(dim=0), references)
    outer = [p for p in parts if isinstance(p, Outer)]
    if len(outer) != len(parts):
        raise ValueError("parts of one parameter must all be Outer or all Materialised")
    dots = sum(_dots(p, references) for p in outer)
    sq = sum(
        (1.0 if j == k else 2.0) * _cross(outer[j], outer[k])
        for j in range(len(outer))
        for k in range(j, len(outer))
    )
    assert isinstance(dots, Tensor) and isinstance(sq, Tensor)
    return dots, sq


def _dots(part: Outer, references: Tensor) -> Tensor:
    """``sum_t u_t^T R v_t`` per example and reference."""
    found = []
    for r in references:
        if part.ids is not None:
            found.append((r[part.ids] * part.v).sum(dim=(1, 2)))
        else:
            assert part.u is not None
            found.append(((part.u @ r) * part.v).sum(dim=(1, 2)))
    return torch.stack(found, dim=1)


def _cross(a: Outer, b: Outer) -> Tensor:
    """``sum_{t, s} (u_t . u'_s)(v_t . v'_s)`` per example."""
    vv = a.v @ b.v.transpose(1, 2)  # (example, token_a, token_b)
    if a.ids is not None and b.ids is not None:
        uu = (a.ids.unsqueeze(2) == b.ids.unsqueeze(1)).to(vv.dtype)
    elif a.ids is not None:
        assert b.u is not None
        uu = torch.gather(b.u, 2, a.ids.unsqueeze(1).expand(-1, b.u.shape[1], -1)).transpose(1, 2)
    elif b.ids is not None:
        return _cross(b, a)
    else:
        assert a.u is not None and b.u is not None
        uu = a.u @ b.u.transpose(1, 2)
    return (uu * vv).sum(dim=(1, 2))
