"""Alignment between a trait gradient and a distillation gradient.

The trait gradient ``g_t`` is the gradient of the loss that measures the trait
(for MNIST, cross-entropy on labelled digits); the distillation gradient
``g_d`` is the gradient of the loss the student is trained on. Their cosine,
norms and projection coefficient say how much a distillation step moves the
student along the trait, globally and layer by layer.

Example:
    >>> import torch
    >>> g_t = {"0.weight": torch.tensor([[1.0, 0.0]]), "1.weight": torch.tensor([[0.0, 2.0]])}
    >>> g_d = {"0.weight": torch.tensor([[1.0, 1.0]]), "1.weight": torch.tensor([[0.0, -2.0]])}
    >>> a = alignment(g_t, g_d)
    >>> round(float(a.cosine), 4), a.layers, [round(c, 4) for c in a.layer_cosine.tolist()]
    (-0.5477, ('0', '1'), [0.7071, -1.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.gradops import check_compatible, group_by_layer, safe_divide

__all__ = [
    "Alignment",
    "ExampleAlignment",
    "alignment",
    "example_alignment",
    "summarize",
]


class Alignment(NamedTuple):
    """Alignment of a distillation gradient with a trait gradient.

    Attributes:
        cosine: ``cos(g_t, g_d)``, shape ``()``.
        trait_norm: ``||g_t||``, shape ``()``.
        distill_norm: ``||g_d||``, shape ``()``.
        projection: ``<g_d, g_t> / ||g_t||^2``, the coefficient of ``g_d`` along ``g_t``, ``()``.
        layer_cosine: Per layer, shape ``(layer,)``.
        layer_trait_norm: Shape ``(layer,)``.
        layer_distill_norm: Shape ``(layer,)``.
        layer_projection: Shape ``(layer,)``.
        layers: Layer names (module prefixes), in parameter order.
    """

    cosine: Tensor
    trait_norm: Tensor
    distill_norm: Tensor
    projection: Tensor
    layer_cosine: Tensor
    layer_trait_norm: Tensor
    layer_distill_norm: Tensor
    layer_projection: Tensor
    layers: tuple[str, ...]


def _by_layer(values: Mapping[str, Tensor], groups: Mapping[str, list[str]]) -> Tensor:
    """Sum per-parameter values within each layer; shape ``(layer, *rest)``."""
    return torch.stack([sum(values[n] for n in names) for names in groups.values()])


def alignment(trait: Mapping[str, Tensor], distill: Mapping[str, Tensor]) -> Alignment:
    """Measure how a distillation gradient lines up with a trait gradient.

    Zero-norm gradients give cosine and projection 0.0 (the norms show the
    zero), never NaN.

    Args:
        trait: The trait gradient ``g_t``.
        distill: The distillation gradient ``g_d``, with the same keys and shapes.

    Returns:
        The global and per-layer :class:`Alignment`.
    """
    check_compatible(trait, distill, what="trait and distillation gradients")
    groups = group_by_layer(trait)
    dot = {n: torch.vdot(trait[n].reshape(-1), distill[n].reshape(-1)) for n in trait}
    sq_t = {n: trait[n].pow(2).sum() for n in trait}
    sq_d = {n: distill[n].pow(2).sum() for n in trait}
    layer_dot, layer_sq_t, layer_sq_d = (_by_layer(v, groups) for v in (dot, sq_t, sq_d))
    total_dot, total_sq_t, total_sq_d = layer_dot.sum(), layer_sq_t.sum(), layer_sq_d.sum()
    return Alignment(
        cosine=safe_divide(total_dot, (total_sq_t * total_sq_d).sqrt()),
        trait_norm=total_sq_t.sqrt(),
        distill_norm=total_sq_d.sqrt(),
        projection=safe_divide(total_dot, total_sq_t),
        layer_cosine=safe_divide(layer_dot, (layer_sq_t * layer_sq_d).sqrt()),
        layer_trait_norm=layer_sq_t.sqrt(),
        layer_distill_norm=layer_sq_d.sqrt(),
        layer_projection=safe_divide(layer_dot, layer_sq_t),
        layers=tuple(groups),
    )


class ExampleAlignment(NamedTuple):
    """Alignment of each example's gradient with a reference gradient.

    Attributes:
        cosine: ``cos(g_i, r)``, shape ``(example,)``.
        dot: ``<g_i, r>``, shape ``(example,)``.
        norm: ``||g_i||``, shape ``(example,)``.
        layer_cosine: Per layer, shape ``(example, layer)``.
        layers: Layer names.
    """

    cosine: Tensor
    dot: Tensor
    norm: Tensor
    layer_cosine: Tensor
    layers: tuple[str, ...]


def example_alignment(
    dots: Mapping[str, Tensor], sq_norms: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> ExampleAlignment:
    """Per-example alignment from :func:`~gradlens.per_example_dots` output.

    Args:
        dots: Name -> ``(example,)`` inner products ``<g_i[p], r[p]>``.
        sq_norms: Name -> ``(example,)`` squared norms ``||g_i[p]||^2``.
        reference: The reference gradient ``r`` the dots were taken with.

    Returns:
        The per-example :class:`ExampleAlignment`.
    """
    check_compatible(dots, sq_norms, what="per-example dots and squared norms")
    if dots.keys() != reference.keys():
        check_compatible({n: dots[n][0] for n in dots}, reference, what="dots and reference")
    groups = group_by_layer(dots)
    ref_sq = _by_layer({n: reference[n].pow(2).sum() for n in reference}, groups)
    layer_dot = _by_layer(dots, groups).T
    layer_sq = _by_layer(sq_norms, groups).T
    dot, sq = layer_dot.sum(dim=1), layer_sq.sum(dim=1)
    return ExampleAlignment(
        cosine=safe_divide(dot, (sq * ref_sq.sum()).sqrt()),
        dot=dot,
        norm=sq.sqrt(),
        layer_cosine=safe_divide(layer_dot, (layer_sq * ref_sq).sqrt()),
        layers=tuple(groups),
    )


QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(values: Tensor, quantiles: Sequence[float] = QUANTILES) -> dict[str, Tensor]:
    """Summarise per-example values: mean, quantiles and the fraction above zero.

    Args:
        values: Shape ``(example,)``.
        quantiles: Levels in [0, 1].

    Returns:
        ``{"mean": (), "quantile": (quantile,), "frac_positive": ()}``.

    Example:
        >>> s = summarize(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
        >>> float(s["mean"]), float(s["frac_positive"])
        (0.5, 0.5)
    """
    values = values.detach().float()
    levels = torch.tensor(list(quantiles), dtype=values.dtype, device=values.device)
    return {
        "mean": values.mean(),
        "quantile": torch.quantile(values, levels),
        "frac_positive": (values > 0).float().mean(),
    }
