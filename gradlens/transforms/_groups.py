"""Scope groups and per-group statistics shared by the aligned transforms (private).

A *group* is a list of parameter names that share one projection coefficient:
all names for ``scope="global"``, one group per layer (``group_by_layer``, in
first-seen order) for ``scope="layer"``. Statistics are stacked to shape
``(group,)`` and turned into the state's shape, ``()`` or ``(layer,)``, by
:func:`to_scope`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import reduce
from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.gradops import check_compatible, dot, group_by_layer, safe_divide, sq_norm
from gradlens.transforms.base import Scope

SCOPES: tuple[Scope, ...] = ("global", "layer")


class GroupStats(NamedTuple):
    """Per-group inner products of a gradient ``g`` with a reference ``r``.

    Attributes:
        dot: ``<g, r>`` per group, shape ``(group,)``.
        sq_norm: ``||g||^2`` per group, shape ``(group,)``.
        ref_sq_norm: ``||r||^2`` per group, shape ``(group,)``.
    """

    dot: Tensor
    sq_norm: Tensor
    ref_sq_norm: Tensor

    @property
    def coef(self) -> Tensor:
        """``<g, r> / ||r||^2``, 0 where ``r`` is zero; shape ``(group,)``."""
        return safe_divide(self.dot, self.ref_sq_norm)

    @property
    def cosine(self) -> Tensor:
        """Cosine of ``g`` with ``r``, 0 where either is zero; shape ``(group,)``."""
        return safe_divide(self.dot, self.sq_norm.sqrt() * self.ref_sq_norm.sqrt())


def cosine_after(after: GroupStats, before: GroupStats) -> Tensor:
    """Cosine of the outgoing gradient with ``r``, 0 where it vanished to rounding.

    Removing the component of a gradient parallel to ``r`` (always the case
    for a one-entry layer) leaves rounding noise whose cosine with ``r`` is a
    random sign. Where ``||g'|| <= 8 eps ||g||`` (``eps`` of the dtype) the
    cosine is reported as 0.

    Returns:
        Shape ``(group,)``.
    """
    eps = torch.finfo(after.dot.dtype).eps
    resolved = after.sq_norm > (8 * eps) ** 2 * before.sq_norm
    return torch.where(resolved, after.cosine, 0.0)


def check_options(alpha: float, scope: str) -> None:
    """Raise ``ValueError`` for a non-finite ``alpha`` or an unknown ``scope``."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")


def groups_of(names: Iterable[str], scope: Scope) -> list[list[str]]:
    """Return the groups of parameter names for ``scope``."""
    names = list(names)
    if not names:
        raise ValueError("the gradient dict is empty: there is no parameter to transform.")
    return [names] if scope == "global" else list(group_by_layer(names).values())


def to_scope(values: Tensor, scope: Scope) -> Tensor:
    """Shape ``(group,)`` values as the state stores them: ``()`` or ``(layer,)``."""
    return values.reshape(()) if scope == "global" else values


def zeros_for(params: Mapping[str, Tensor], scope: Scope) -> Tensor:
    """Zeros shaped, typed and placed like the state fields for ``params``."""
    dtype = reduce(torch.promote_types, (p.dtype for p in params.values()))
    first = next(iter(params.values()))
    zeros = torch.zeros(len(groups_of(params, scope)), dtype=dtype, device=first.device)
    return to_scope(zeros, scope)


def match_reference(
    grads: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Check ``reference`` against ``grads`` and cast it to their dtypes and devices."""
    check_compatible(grads, reference, what="gradients and reference")
    return {name: reference[name].to(grads[name]) for name in grads}


def _select(values: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    return {name: values[name] for name in names}


def group_stats(
    grads: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    groups: list[list[str]],
    ref_sq_norm: Tensor | None = None,
) -> GroupStats:
    """Compute :class:`GroupStats`; pass ``ref_sq_norm`` to reuse it."""
    dots = torch.stack([dot(_select(grads, g), _select(reference, g)) for g in groups])
    norms = torch.stack([sq_norm(_select(grads, g)) for g in groups])
    if ref_sq_norm is None:
        ref_sq_norm = torch.stack([sq_norm(_select(reference, g)) for g in groups])
    return GroupStats(dots, norms, ref_sq_norm)


def subtract_along(
    grads: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    groups: list[list[str]],
    amount: Tensor,
) -> dict[str, Tensor]:
    """Return ``g - amount[k] * r`` on the names of each group ``k``, in ``grads``' order.

    Args:
        grads: The gradient dict.
        reference: Same keys and shapes as ``grads``.
        groups: The groups of names.
        amount: Shape ``(group,)``.

    Returns:
        A dict with the keys, shapes and dtypes of ``grads``.
    """
    index = {name: k for k, names in enumerate(groups) for name in names}
    return {
        name: grads[name] - (amount[index[name]] * reference[name]).to(grads[name].dtype)
        for name in grads
    }
