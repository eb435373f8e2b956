"""Scale each example's own aligned component, from per-example inner products.

For a mean-reduced loss the batch gradient is ``g = mean_i g_i``. Given, for
every parameter ``p``, the inner products ``<g_i[p], r[p]>`` of each example's
gradient with the reference (``gradlens.per_example_dots`` computes them
without building the ``g_i``), the per-example coefficient is
``c_i = sum_p <g_i[p], r[p]> / ||r||^2`` (per layer with ``scope="layer"``), and::

    g <- g - (1 - alpha) * mean_i f(c_i) * r

with ``f`` the identity, or ``relu`` with ``only_positive``. This is the mean of
the plain :func:`~gradlens.transforms.scale_aligned` applied to every ``g_i``.

Without ``only_positive`` it is exactly the plain transform on ``g``: the mean
of the per-example coefficients is the coefficient of the mean gradient,
``mean_i <g_i, r> / ||r||^2 = <g, r> / ||r||^2``. The variant differs only with
``only_positive=True``, where examples that pull along ``r`` are corrected and
those that push against it are kept.

Example:
    >>> import torch
    >>> g_i = {"w": torch.tensor([[2.0, 1.0], [-1.0, 1.0]])}  # two examples
    >>> r = {"w": torch.tensor([1.0, 0.0])}
    >>> g = {"w": g_i["w"].mean(0)}
    >>> dots = {"w": g_i["w"] @ r["w"]}
    >>> tx = remove_aligned_per_example(only_positive=True)
    >>> new_g, state = tx.update(g, tx.init(g), reference=r, example_dots=dots)
    >>> new_g["w"]  # mean of [0, 1] and [-1, 1]
    tensor([-0.5000,  1.0000])
    >>> float(state.acted), float(state.coef), float(state.acted_coef)
    (0.5, 0.5, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.alignment.gradops import safe_divide
from gradlens.alignment.layerstats import layer_stats, sum_groups
from gradlens.errors import GradientMismatchError
from gradlens.transforms._groups import (
    check_options,
    cosine_after,
    groups_of,
    match_reference,
    subtract_along,
    to_scope,
    zeros_for,
)
from gradlens.transforms.base import (
    GradientTransform,
    Scope,
    State,
    check_state,
    mark_needs_example_dots,
)

__all__ = [
    "ScaleAlignedPerExampleState",
    "remove_aligned_per_example",
    "reverse_aligned_per_example",
    "scale_aligned_per_example",
]


class ScaleAlignedPerExampleState(NamedTuple):
    """What :func:`scale_aligned_per_example` did at its last step.

    Every field has shape ``()`` with ``scope="global"`` and ``(layer,)`` with
    ``scope="layer"``; ``init`` fills them with zeros.

    Attributes:
        cosine_before: Cosine of the incoming gradient with the reference.
        cosine_after: Cosine of the outgoing gradient with the reference; 0
            where the outgoing gradient is zero to rounding (``||g'|| <= 8 eps
            ||g||``), as after removing a gradient parallel to the reference.
        coef: ``mean_i c_i``, the mean per-example coefficient (the
            coefficient of the mean gradient).
        acted_coef: ``mean_i f(c_i)``, the mean coefficient that was scaled.
        acted: Fraction of examples whose component was scaled.
    """

    cosine_before: Tensor
    cosine_after: Tensor
    coef: Tensor
    acted_coef: Tensor
    acted: Tensor


def _dots_by_group(
    example_dots: Mapping[str, Tensor], grads: Mapping[str, Tensor], groups: list[list[str]]
) -> Tensor:
    """Sum ``example_dots`` over each group's names: shape ``(example, group)``."""
    if example_dots.keys() != grads.keys():
        raise GradientMismatchError(
            "example_dots and gradients have different keys: only in example_dots "
            f"{sorted(set(example_dots) - set(grads))}, only in the gradients "
            f"{sorted(set(grads) - set(example_dots))}. Compute the dots over the same params."
        )
    lengths = {name: tuple(value.shape) for name, value in example_dots.items()}
    shapes = set(lengths.values())
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0] == 0:
        raise GradientMismatchError(
            f"example_dots must all have the same shape (example,) with example > 0; got {lengths}."
        )
    order = [name for names in groups for name in names]
    sizes = [len(names) for names in groups]
    return sum_groups(torch.stack([example_dots[name] for name in order]), sizes).T


def scale_aligned_per_example(
    alpha: float, scope: Scope = "global", only_positive: bool = False
) -> GradientTransform:
    """Scale every example's component along the reference by ``alpha``, then average.

    The update acts on the mean gradient ``g = mean_i g_i`` of a mean-reduced
    loss and computes ``g - (1 - alpha) * mean_i f(c_i) * r``, where
    ``c_i = <g_i, r> / ||r||^2`` and ``f`` is ``relu`` with ``only_positive``,
    the identity otherwise. Without ``only_positive`` this equals
    :func:`~gradlens.transforms.scale_aligned` exactly (the mean of the
    per-example coefficients is the coefficient of the mean).

    Its update takes a required keyword argument ``example_dots``: for every
    name of ``grads``, a tensor of shape ``(example,)`` holding
    ``<g_i[name], r[name]>``, as returned first by ``gradlens.per_example_dots``.

    Args:
        alpha: Factor on each example's aligned component: 0 removes, -1 reverses.
        scope: ``"global"`` for one ``c_i`` over all parameters, ``"layer"`` for
            one per layer.
        only_positive: Act only on examples (and layers) with ``c_i > 0``.

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` with state
        :class:`ScaleAlignedPerExampleState`.

    Raises:
        ValueError: For a non-finite ``alpha`` or an unknown ``scope``.
    """
    check_options(alpha, scope)

    def init(params: Mapping[str, Tensor]) -> ScaleAlignedPerExampleState:
        zeros = zeros_for(params, scope)
        return ScaleAlignedPerExampleState(zeros, zeros, zeros, zeros, zeros)

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        example_dots: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], ScaleAlignedPerExampleState]:
        del params, extra
        check_state(state, ScaleAlignedPerExampleState, factory="scale_aligned_per_example")
        reference = match_reference(grads, reference)
        groups = groups_of(grads, scope)
        before = layer_stats(grads, reference=reference, scope=scope)
        dots = _dots_by_group(example_dots, grads, groups).to(before.dot)
        coef = safe_divide(dots, before.ref_sq_norm)  # (example, group)
        acted = (before.ref_sq_norm > 0).expand_as(coef)
        if only_positive:
            acted = acted & (coef > 0)
        acted_coef = (acted * coef).mean(0)
        new_grads = subtract_along(grads, reference, groups, (1 - alpha) * acted_coef)
        after = layer_stats(
            new_grads, reference=reference, scope=scope, ref_sq_norm=before.ref_sq_norm
        )
        new_state = ScaleAlignedPerExampleState(
            cosine_before=to_scope(before.cosine, scope),
            cosine_after=to_scope(cosine_after(after, before), scope),
            coef=to_scope(coef.mean(0), scope),
            acted_coef=to_scope(acted_coef, scope),
            acted=to_scope(acted.to(coef.dtype).mean(0), scope),
        )
        return new_grads, new_state

    mark_needs_example_dots(update)
    return GradientTransform(init, update)


def remove_aligned_per_example(
    scope: Scope = "global", only_positive: bool = False
) -> GradientTransform:
    """Remove every example's aligned component: ``scale_aligned_per_example(0)``."""
    return scale_aligned_per_example(0.0, scope, only_positive)


def reverse_aligned_per_example(
    scope: Scope = "global", only_positive: bool = False
) -> GradientTransform:
    """Reverse every example's aligned component: ``scale_aligned_per_example(-1)``."""
    return scale_aligned_per_example(-1.0, scope, only_positive)
