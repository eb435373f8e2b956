"""A specificity control: remove as much as ``remove_aligned`` would, along a random direction.

:func:`~gradlens.transforms.remove_aligned` subtracts ``c r`` with ``c = <g, r> /
||r||^2``: a vector of norm ``s = |<g, r>| / ||r||`` along the reference, on
the side of it that ``g`` lies. :func:`remove_random` subtracts a vector of the
same norm ``s`` along a random unit direction ``u`` instead, on the side of it
that ``g`` lies::

    g <- g - s * sign(<g, u>) * u,     s = |<g, r>| / ||r||

per group (all parameters with ``scope="global"``, each layer with
``scope="layer"``), so ``||g' - g|| = s`` exactly, as for ``remove_aligned``.
If an intervention's effect on a trait comes from removing the trait
direction and not from perturbing the update by that much, the random
removal should not reproduce it. Where ``remove_aligned`` would do nothing
(a zero reference, or ``c <= 0`` with ``only_positive``) this does nothing.

``u`` is a fresh standard-normal draw (``torch.randn`` on the gradients'
device, in their dtype, at least float32), normalised per group, at every
update, from a ``torch.Generator`` seeded with the state's ``key`` and
``count`` alone; ``count`` goes up by one per update. The same state gives the
same direction on the same kind of device (CPU and CUDA generators differ).
No global random state is read or changed. ``torch.func.vmap`` cannot batch a
``torch.Generator``: for stacked models use
``per_model(remove_random(...), vectorize=False)``, which gives each model its
own key.

Example:
    >>> import torch
    >>> g = {"w": torch.tensor([3.0, 4.0, 0.0])}
    >>> r = {"w": torch.tensor([1.0, 0.0, 0.0])}
    >>> tx = remove_random(seed=0)
    >>> new_g, state = tx.update(g, tx.init(g), reference=r)
    >>> round(float(state.removed_norm), 6), round(float((new_g["w"] - g["w"]).norm()), 6)
    (3.0, 3.0)
    >>> int(state.count), int(state.key)
    (1, 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.alignment.gradops import safe_divide
from gradlens.alignment.layerstats import layer_stats
from gradlens.errors import GradlensError
from gradlens.transforms._groups import (
    check_options,
    cosine_after,
    groups_of,
    match_reference,
    subtract_along,
    to_scope,
    zeros_for,
)
from gradlens.transforms._random import mix_seed
from gradlens.transforms.base import GradientTransform, Scope, State, check_state

__all__ = ["RemoveRandomState", "remove_random"]


class RemoveRandomState(NamedTuple):
    """The random key and what :func:`remove_random` did at its last step.

    ``key`` and ``count`` are int64 of shape ``()``, kept on the CPU (read
    without a device sync); the other fields have shape ``()`` with
    ``scope="global"`` and ``(layer,)`` with ``scope="layer"``.

    Attributes:
        key: The random key (the factory's ``seed``); the same key and count
            give the same direction.
        count: Updates made so far; the direction of the next one is drawn from it.
        cosine_before: Cosine of the incoming gradient with the reference.
        cosine_after: Cosine of the outgoing gradient with the reference (0
            where it vanished to rounding).
        coef: ``<g, r> / ||r||^2`` of the incoming gradient, as ``remove_aligned`` records it.
        removed_norm: ``||g - g'||``, the norm removed: ``|<g, r>| / ||r||`` where it acted.
        acted: 1 where a component was removed, 0 where it was left alone.
    """

    key: Tensor
    count: Tensor
    cosine_before: Tensor
    cosine_after: Tensor
    coef: Tensor
    removed_norm: Tensor
    acted: Tensor


def remove_random(
    seed: int, scope: Scope = "global", only_positive: bool = False
) -> GradientTransform:
    """Subtract, along a random direction, a vector of the norm ``remove_aligned`` would remove.

    Args:
        seed: The random key (an int ``>= 0``); the whole sequence of
            directions follows from it.
        scope: ``"global"`` for one direction and one norm over all
            parameters, ``"layer"`` for one of each per layer.
        only_positive: Act only where ``<g, r> > 0``, as ``remove_aligned(only_positive=True)``.

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` with state
        :class:`RemoveRandomState`. Its update keeps the keys, shapes and
        dtypes of ``grads``.

    Raises:
        ValueError: For a negative ``seed`` or an unknown ``scope``.
        GradlensError: From ``update`` under ``torch.func.vmap``, naming the fix.
    """
    check_options(0.0, scope)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")

    def init(params: Mapping[str, Tensor]) -> RemoveRandomState:
        zeros = zeros_for(params, scope)
        key = torch.tensor(seed, dtype=torch.int64)
        return RemoveRandomState(key, torch.zeros_like(key), zeros, zeros, zeros, zeros, zeros)

    def update(
        grads: Mapping[str, Tensor],
        state: State,
        params: Mapping[str, Tensor] | None = None,
        *,
        reference: Mapping[str, Tensor],
        **extra: object,
    ) -> tuple[dict[str, Tensor], RemoveRandomState]:
        del params, extra
        check_state(state, RemoveRandomState, factory="remove_random")
        reference = match_reference(grads, reference)
        groups = groups_of(grads, scope)
        before = layer_stats(grads, reference=reference, scope=scope)
        acted = before.ref_sq_norm > 0
        if only_positive:
            acted = acted & (before.coef > 0)
        removed = torch.where(acted, safe_divide(before.dot.abs(), before.ref_norm), 0.0)
        direction = _direction(grads, state.key, state.count)
        along = layer_stats(grads, reference=direction, scope=scope)
        side = torch.where(along.dot < 0, -1.0, 1.0).to(removed.dtype)
        amount = safe_divide(removed * side, along.ref_norm)
        new_grads = subtract_along(grads, direction, groups, amount)
        after = layer_stats(
            new_grads, reference=reference, scope=scope, ref_sq_norm=before.ref_sq_norm
        )
        new_state = RemoveRandomState(
            key=state.key,
            count=state.count + 1,
            cosine_before=to_scope(before.cosine, scope),
            cosine_after=to_scope(cosine_after(after, before), scope),
            coef=to_scope(before.coef, scope),
            removed_norm=to_scope(removed, scope),
            acted=to_scope(acted.to(removed.dtype), scope),
        )
        return new_grads, new_state

    return GradientTransform(init, update)


def _direction(grads: Mapping[str, Tensor], key: Tensor, count: Tensor) -> dict[str, Tensor]:
    """Standard-normal draws shaped like ``grads``, from ``(key, count)``, in ``grads``' order.

    One ``torch.randn`` of all entries, in key order, then split by parameter.
    """
    values = list(grads.values())
    if any(torch._C._functorch.is_functorch_wrapped_tensor(v) for v in [*values, key]):
        raise GradlensError(
            "remove_random draws its directions with a torch.Generator, which torch.func.vmap "
            "cannot batch. For models stacked along a leading axis use "
            "per_model(remove_random(...), vectorize=False)."
        )
    first = values[0]
    dtype = torch.promote_types(first.dtype, torch.float32)
    generator = torch.Generator(device=first.device)
    generator.manual_seed(mix_seed(int(key), int(count)))
    sizes = [g.numel() for g in values]
    flat = torch.randn(sum(sizes), generator=generator, dtype=dtype, device=first.device)
    parts = flat.split(sizes)
    return {
        name: part.reshape(g.shape).to(g)
        for (name, g), part in zip(grads.items(), parts, strict=True)
    }
