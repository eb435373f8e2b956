"""Alignment between a gradient and a reference gradient.

In gradlens the reference is usually the trait gradient ``g_t`` (the gradient
of the loss that measures the trait, for MNIST cross-entropy on labelled
digits) and the gradient is the training gradient ``g`` (the gradient of the
loss the model is trained on, for example a distillation loss). Their cosine,
norms and projection coefficient say how much a training step moves the model
along the trait, globally and layer by layer. The statistics come from
:func:`gradlens.alignment.layerstats.layer_stats`.

Example:
    >>> import torch
    >>> g_t = {"0.weight": torch.tensor([[1.0, 0.0]]), "1.weight": torch.tensor([[0.0, 2.0]])}
    >>> g = {"0.weight": torch.tensor([[1.0, 1.0]]), "1.weight": torch.tensor([[0.0, -2.0]])}
    >>> a = alignment(g, reference=g_t)
    >>> round(float(a.cosine), 4), a.layers, [round(c, 4) for c in a.layer_cosine.tolist()]
    (-0.5477, ('0', '1'), [0.7071, -1.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.alignment.gradops import check_compatible, check_finite, safe_divide
from gradlens.alignment.layerstats import groups_for, layer_sq_norms, layer_stats, sum_groups

__all__ = [
    "QUANTILES",
    "Alignment",
    "ExampleAlignment",
    "alignment",
    "example_alignment",
    "summarize",
]


class Alignment(NamedTuple):
    """Alignment of a gradient ``g`` with a reference gradient ``r``.

    Attributes:
        cosine: ``cos(g, r)``, shape ``()``.
        norm: ``||g||``, shape ``()``.
        reference_norm: ``||r||``, shape ``()``.
        projection: ``<g, r> / ||r||^2``, the coefficient of ``g`` along ``r``, ``()``.
        layer_cosine: Per layer, shape ``(layer,)``.
        layer_norm: Shape ``(layer,)``.
        layer_reference_norm: Shape ``(layer,)``.
        layer_projection: Shape ``(layer,)``.
        layers: Layer names (module prefixes), in parameter order.
    """

    cosine: Tensor
    norm: Tensor
    reference_norm: Tensor
    projection: Tensor
    layer_cosine: Tensor
    layer_norm: Tensor
    layer_reference_norm: Tensor
    layer_projection: Tensor
    layers: tuple[str, ...]


def alignment(grad: Mapping[str, Tensor], *, reference: Mapping[str, Tensor]) -> Alignment:
    """Measure how a gradient lines up with a reference gradient.

    Zero-norm gradients give cosine and projection 0.0 (the norms show the
    zero), never NaN.

    Args:
        grad: The gradient ``g``, for example the training gradient.
        reference: The reference ``r``, for example the trait gradient, with
            the same keys and shapes.

    Returns:
        The global and per-layer :class:`Alignment`.

    Raises:
        GradientMismatchError: If the keys or shapes of ``grad`` and ``reference`` differ.
        NonFiniteGradientError: If either has NaN or infinite values (their
            cosine would be NaN), naming the parameters.
    """
    check_compatible(grad, reference, what="gradient and reference")
    check_finite(grad, what="gradient")
    check_finite(reference, what="reference gradient")
    return alignment_of_finite(grad, reference=reference)


def alignment_of_finite(
    grad: Mapping[str, Tensor], *, reference: Mapping[str, Tensor]
) -> Alignment:
    """:func:`alignment` without its checks, for gradients already checked finite (no sync)."""
    layers = layer_stats(grad, reference=reference)
    total = layers.total()
    return Alignment(
        cosine=total.cosine[0],
        norm=total.norm[0],
        reference_norm=total.ref_norm[0],
        projection=total.coef[0],
        layer_cosine=layers.cosine,
        layer_norm=layers.norm,
        layer_reference_norm=layers.ref_norm,
        layer_projection=layers.coef,
        layers=layers.groups,
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
    dots: Mapping[str, Tensor],
    sq_norms: Mapping[str, Tensor],
    *,
    reference: Mapping[str, Tensor],
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
    groups = groups_for(list(dots), "layer")
    order = [name for names in groups.values() for name in names]
    sizes = [len(names) for names in groups.values()]
    ref_sq = layer_sq_norms({n: reference[n] for n in order})
    layer_dot = sum_groups(torch.stack([dots[n] for n in order]), sizes).T
    layer_sq = sum_groups(torch.stack([sq_norms[n] for n in order]), sizes).T
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

    Leading dims (a ``model`` dim, say) are kept: each row is summarised alone.

    Args:
        values: Shape ``(..., example)``.
        quantiles: Levels in [0, 1].

    Returns:
        ``{"mean": (...), "quantile": (..., quantile), "frac_positive": (...)}``;
        all NaN for no values. Exact zeros (the cosine of a zero gradient) do
        not count as positive.

    Example:
        >>> s = summarize(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
        >>> float(s["mean"]), float(s["frac_positive"])
        (0.5, 0.5)
        >>> summarize(torch.tensor([[0.0, 1.0], [2.0, -1.0]]))["quantile"].shape
        torch.Size([2, 5])
    """
    values = values.detach().float()
    levels = torch.tensor(list(quantiles), dtype=values.dtype, device=values.device)
    lead = values.shape[:-1]
    if values.shape[-1] == 0:  # no examples: every summary is NaN (torch.quantile would raise)
        nan = values.new_full(lead, float("nan"))
        return {
            "mean": nan,
            "quantile": levels.new_full((*lead, len(levels)), float("nan")),
            "frac_positive": nan.clone(),
        }
    return {
        "mean": values.mean(dim=-1),
        "quantile": torch.quantile(values, levels, dim=-1).movedim(0, -1),
        "frac_positive": (values > 0).float().mean(dim=-1),
    }
