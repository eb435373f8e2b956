"""Scope groups and helpers shared by the aligned transforms (private).

A *group* is a list of parameter names that share one projection coefficient:
all names for ``scope="global"``, one group per layer (in first-seen order) for
``scope="layer"``, as :func:`gradlens.alignment.layerstats.groups_for` makes them. The
per-group statistics are :func:`gradlens.alignment.layerstats.layer_stats`, shape
``(group,)``, turned into the state's shape, ``()`` or ``(layer,)``, by
:func:`to_scope`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import reduce

import torch
from torch import Tensor

from gradlens.alignment.gradops import check_compatible
from gradlens.alignment.layerstats import LayerStats, Scope, groups_for

SCOPES: tuple[Scope, ...] = ("global", "layer")


def cosine_after(after: LayerStats, before: LayerStats) -> Tensor:
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
    return list(groups_for(list(names), scope).values())


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


def restrict_to_support(
    grads: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``r ⊙ 1[g != 0]``: the reference with every entry zeroed where ``g`` is exactly zero.

    The support is read from exact zeros of ``g``: entries that the loss does
    not reach (a parameter it never reads, the rows of logits it never
    distils) have a gradient of exactly ``0.0``, which no rounding produces
    from a nonzero sum of nonzero terms except by rare cancellation.

    Returns:
        A dict with the keys, shapes and dtypes of ``reference``.
    """
    return {
        name: torch.where(grads[name] != 0, r, torch.zeros_like(r)) for name, r in reference.items()
    }
