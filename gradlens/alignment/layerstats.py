"""Inner products and norms of a gradient with a reference, per group of parameters.

The one implementation behind every per-layer statistic in gradlens: the
alignment records (:mod:`gradlens.alignment.measures`) and the aligned transforms
(:mod:`gradlens.transforms`) both call :func:`layer_stats`. A *group* is a set
of parameter names that share one statistic: one group per layer (the module
prefix of the name, :func:`~gradlens.alignment.gradops.group_by_layer`) or one group of
everything (``scope="global"``).

The per-parameter values are computed with a fixed number of tensor
operations whatever the parameter count (``torch._foreach_norm`` for the
squared norms, one stacked ``vdot`` per parameter for the inner products),
since on a GPU a probed step is bound by how many small operations it
launches, not by their arithmetic.

Example:
    >>> import torch
    >>> g = {"0.weight": torch.tensor([[1.0, 1.0]]), "1.weight": torch.tensor([[0.0, -2.0]])}
    >>> r = {"0.weight": torch.tensor([[1.0, 0.0]]), "1.weight": torch.tensor([[0.0, 2.0]])}
    >>> s = layer_stats(g, reference=r)
    >>> s.groups, [round(c, 4) for c in s.cosine.tolist()]
    (('0', '1'), [0.7071, -1.0])
    >>> round(float(s.total().cosine), 4)
    -0.5477
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gradlens.alignment.gradops import check_compatible, group_by_layer, safe_divide
from gradlens.numerics import accumulation_dtype

__all__ = [
    "GLOBAL",
    "LayerStats",
    "Scope",
    "groups_for",
    "layer_sq_norms",
    "layer_stats",
    "sum_groups",
]

Scope = Literal["global", "layer"]
"""``"global"``: one group of all parameters; ``"layer"``: one group per layer."""

GLOBAL = "all"
"""The name of the single group of ``scope="global"``."""


class LayerStats(NamedTuple):
    """Inner products of a gradient ``g`` with a reference ``r``, per group.

    Attributes:
        dot: ``<g, r>`` per group, shape ``(group,)``.
        sq_norm: ``||g||^2`` per group, shape ``(group,)``.
        ref_sq_norm: ``||r||^2`` per group, shape ``(group,)``.
        groups: Group names: layer names, or ``("all",)``.
    """

    dot: Tensor
    sq_norm: Tensor
    ref_sq_norm: Tensor
    groups: tuple[str, ...]

    @property
    def coef(self) -> Tensor:
        """``<g, r> / ||r||^2``, the coefficient of ``g`` along ``r``; 0 where ``r`` is 0."""
        return safe_divide(self.dot, self.ref_sq_norm)

    @property
    def cosine(self) -> Tensor:
        """``cos(g, r)``; 0 where either is zero."""
        return safe_divide(self.dot, (self.sq_norm * self.ref_sq_norm).sqrt())

    @property
    def norm(self) -> Tensor:
        """``||g||`` per group."""
        return self.sq_norm.sqrt()

    @property
    def ref_norm(self) -> Tensor:
        """``||r||`` per group."""
        return self.ref_sq_norm.sqrt()

    def total(self) -> LayerStats:
        """The same statistics over all groups at once, as one group ``"all"``."""
        return LayerStats(
            self.dot.sum(dim=0, keepdim=True),
            self.sq_norm.sum(dim=0, keepdim=True),
            self.ref_sq_norm.sum(dim=0, keepdim=True),
            (GLOBAL,),
        )


def groups_for(names: Sequence[str], scope: Scope) -> dict[str, list[str]]:
    """Group parameter names for ``scope``: ``{"all": names}`` or one group per layer.

    Raises:
        ValueError: For an unknown ``scope`` or no names.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}.")
    if not names:
        raise ValueError("the gradient dict is empty: there is no parameter to measure.")
    return {GLOBAL: list(names)} if scope == "global" else group_by_layer(names)


def sum_groups(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """Sum consecutive runs of ``values`` along dim 0: ``(param, ...) -> (group, ...)``.

    ``sizes[k]`` is the number of entries of group ``k``; the entries of each
    group are consecutive. Equal sizes take one reshape and one sum.
    """
    if len(set(sizes)) == 1:
        return values.reshape(len(sizes), sizes[0], *values.shape[1:]).sum(dim=1)
    return torch.stack([part.sum(dim=0) for part in values.split(list(sizes))])


def _sq_norms(values: Sequence[Tensor]) -> Tensor:
    """Squared norm of each tensor, shape ``(len(values),)``.

    ``torch._foreach_norm`` has no vmap batching rule: under ``torch.func``
    transforms (``vmap`` over a leading ``model`` axis, as
    :func:`gradlens.transforms.per_model` does) each norm is one ``vdot``.
    """
    values = list(values)
    if torch.compiler.is_compiling():  # traced by dynamo (gradlens.compiling): no wrapped tensors
        return torch.stack(torch._foreach_norm(values)).square()
    if any(torch._C._functorch.is_functorch_wrapped_tensor(v) for v in values):
        return torch.stack([torch.vdot(v.reshape(-1), v.reshape(-1)) for v in values])
    return torch.stack(torch._foreach_norm(values)).square()


def _layout(names: Sequence[str], scope: Scope) -> tuple[tuple[str, ...], list[str], list[int]]:
    """Group names, the parameter names in group order, and the group sizes."""
    groups = groups_for(names, scope)
    order = [name for members in groups.values() for name in members]
    return tuple(groups), order, [len(members) for members in groups.values()]


def layer_sq_norms(grads: Mapping[str, Tensor], scope: Scope = "layer") -> Tensor:
    """``||g||^2`` per group, shape ``(group,)``, groups as in :func:`layer_stats`."""
    _, order, sizes = _layout(list(grads), scope)
    return sum_groups(_sq_norms([grads[n] for n in order]), sizes)


def layer_stats(
    grads: Mapping[str, Tensor],
    *,
    reference: Mapping[str, Tensor],
    scope: Scope = "layer",
    ref_sq_norm: Tensor | None = None,
) -> LayerStats:
    """Per-group ``<g, r>``, ``||g||^2`` and ``||r||^2``.

    Args:
        grads: The gradient ``g``.
        reference: The reference ``r``, with the keys and shapes of ``grads``.
        scope: One group per layer, or one group of all parameters.
        ref_sq_norm: ``||r||^2`` per group from an earlier call with the same
            reference and scope, to skip recomputing it.

    Returns:
        The :class:`LayerStats`, groups in first-seen order of ``grads``' keys.

    Raises:
        GradientMismatchError: If the keys or shapes differ.
    """
    check_compatible(grads, reference, what="gradient and reference")
    groups, order, sizes = _layout(list(grads), scope)
    g = [grads[n].to(accumulation_dtype(grads[n].dtype)) for n in order]  # bf16: sums in f32
    r = [reference[n].to(a.dtype) for n, a in zip(order, g, strict=True)]
    dots = torch.stack(
        [torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g, r, strict=True)]
    )
    if ref_sq_norm is None:
        ref_sq_norm = sum_groups(_sq_norms(r), sizes)
    return LayerStats(sum_groups(dots, sizes), sum_groups(_sq_norms(g), sizes), ref_sq_norm, groups)
