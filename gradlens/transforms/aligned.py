"""Scale, remove or reverse the component of a gradient aligned with a reference.

With ``c = <g, r> / ||r||^2`` the gradient splits into its aligned component
``c r`` and an orthogonal rest ``g - c r``. :func:`scale_aligned` keeps the rest
and multiplies the aligned component by ``alpha``::

    g <- g - (1 - alpha) * c * r

``alpha = 0`` removes it (projects ``g`` onto the normal plane of ``r``),
``alpha = -1`` reverses it, ``alpha = 1`` changes nothing. With
``scope="layer"`` each layer (``gradops.group_by_layer``) gets its own ``c``;
with ``only_positive`` only components with ``c > 0`` are touched. A zero
reference (or a zero layer of it) leaves the gradient as it is.

With ``on_support=True`` the component is taken along the reference restricted
to the gradient's support, ``r' = r ⊙ 1[g != 0]`` (a coordinate where ``g`` is
exactly zero is outside it), with ``c = <g, r'> / ||r'||^2 = <g, r> / ||r'||^2``::

    g <- g - (1 - alpha) * c * r'

so ``<g', r> = alpha <g, r>`` still holds exactly (``<r', r> = ||r'||^2``), and
nothing is written where ``g`` is zero. The global form (``on_support=False``)
writes ``-(1 - alpha) c r`` into every coordinate of ``r``, also where ``g``
had nothing. Where ``r' = 0`` (a zero layer of it), ``<g, r> = 0`` already and
the gradient is left as it is.

Example:
    >>> import torch
    >>> g = {"w": torch.tensor([1.0, 1.0])}
    >>> r = {"w": torch.tensor([2.0, 0.0])}
    >>> tx = remove_aligned()
    >>> new_g, state = tx.update(g, tx.init(g), reference=r)
    >>> new_g["w"]
    tensor([0., 1.])
    >>> float(state.coef), float(state.cosine_after)
    (0.5, 0.0)
    >>> reverse_aligned().update(g, tx.init(g), reference=r)[0]["w"]
    tensor([-1.,  1.])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

from gradlens.alignment.layerstats import layer_stats
from gradlens.transforms._groups import (
    check_options,
    cosine_after,
    groups_of,
    match_reference,
    restrict_to_support,
    subtract_along,
    to_scope,
    zeros_for,
)
from gradlens.transforms.base import GradientTransform, Scope, State, check_state

__all__ = ["ScaleAlignedState", "remove_aligned", "reverse_aligned", "scale_aligned"]


class ScaleAlignedState(NamedTuple):
    """What :func:`scale_aligned` did at its last step.

    Every field has shape ``()`` with ``scope="global"`` and ``(layer,)`` with
    ``scope="layer"``; ``init`` fills them with zeros.

    Attributes:
        cosine_before: Cosine of the incoming gradient with the reference.
        cosine_after: Cosine of the outgoing gradient with the reference; 0
            where the outgoing gradient is zero to rounding (``||g'|| <= 8 eps
            ||g||``), as after removing a gradient parallel to the reference.
        coef: ``<g, r> / ||r||^2`` of the incoming gradient, the coefficient
            whose component was scaled (``<g, r'> / ||r'||^2`` with ``on_support``).
        acted: 1 where the aligned component was scaled, 0 where it was left
            alone (a zero reference, or ``coef <= 0`` with ``only_positive``).
    """

    cosine_before: Tensor
    cosine_after: Tensor
    coef: Tensor
    acted: Tensor


def scale_aligned(
    alpha: float,
    scope: Scope = "global",
    only_positive: bool = False,
    *,
    on_support: bool = False,
) -> GradientTransform:
    """Multiply the component of the gradient along the reference by ``alpha``.

    Computes ``g - (1 - alpha) * c * r`` with ``c = <g, r> / ||r||^2``, or with
    ``on_support`` ``g - (1 - alpha) * c * r'`` along ``r' = r ⊙ 1[g != 0]``,
    ``c = <g, r'> / ||r'||^2`` (the module docstring).

    Args:
        alpha: Factor on the aligned component: 0 removes, -1 reverses, 1 keeps.
        scope: ``"global"`` for one ``c`` over all parameters, ``"layer"`` for
            one ``c`` per layer.
        only_positive: Act only where ``c > 0`` (where ``g`` points along ``r``).
        on_support: Take the component along the reference restricted to the
            gradient's support (exact zeros of ``g`` are outside it): the
            result is still exactly ``alpha <g, r>`` along ``r`` and is zero
            wherever ``g`` is.

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` with state
        :class:`ScaleAlignedState`. Its update keeps the keys, shapes and
        dtypes of ``grads``; the reference is cast to the gradients' dtype.

    Raises:
        ValueError: For a non-finite ``alpha`` or an unknown ``scope``.
    """
    check_options(alpha, scope)

    def init(params: Mapping[str, Tensor]) -> ScaleAlignedState:
        zeros = zeros_for(params, scope)
        return ScaleAlignedState(zeros, zeros, zeros, zeros)

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], ScaleAlignedState]:
        del params, extra
        check_state(state, ScaleAlignedState, factory="scale_aligned")
        reference = match_reference(grads, reference)
        groups = groups_of(grads, scope)
        before = layer_stats(grads, reference=reference, scope=scope)
        along, onto = reference, before
        if on_support:
            along = restrict_to_support(grads, reference)
            onto = layer_stats(grads, reference=along, scope=scope)
        coef = onto.coef
        acted = onto.ref_sq_norm > 0
        if only_positive:
            acted = acted & (coef > 0)
        new_grads = subtract_along(grads, along, groups, (1 - alpha) * (acted * coef))
        after = layer_stats(
            new_grads, reference=reference, scope=scope, ref_sq_norm=before.ref_sq_norm
        )
        new_state = ScaleAlignedState(
            cosine_before=to_scope(before.cosine, scope),
            cosine_after=to_scope(cosine_after(after, before), scope),
            coef=to_scope(coef, scope),
            acted=to_scope(acted.to(coef.dtype), scope),
        )
        return new_grads, new_state

    return GradientTransform(init, update)


def remove_aligned(
    scope: Scope = "global", only_positive: bool = False, *, on_support: bool = False
) -> GradientTransform:
    """Project the gradient onto the normal plane of the reference: ``scale_aligned(0)``.

    With ``on_support`` the projection uses only the reference's restriction to
    the gradient's support: the result is exactly orthogonal to the reference
    and zero wherever the gradient is.
    """
    return scale_aligned(0.0, scope, only_positive, on_support=on_support)


def reverse_aligned(
    scope: Scope = "global", only_positive: bool = False, *, on_support: bool = False
) -> GradientTransform:
    """Flip the sign of the gradient's component along the reference: ``scale_aligned(-1)``."""
    return scale_aligned(-1.0, scope, only_positive, on_support=on_support)
