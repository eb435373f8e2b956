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

Two kinds of direction ``u`` (``direction=``):

- ``"gaussian"``: isotropic; it controls the *size* of the removal, not where
  it lands (it writes into every coordinate).
- ``"sign_permuted"``: the reference itself with the signs of its nonzero
  entries randomly permuted within each parameter tensor: the same norm, the
  same support and the same magnitude in every coordinate as the reference,
  only the pattern of signs is another. It controls where the removal lands
  and how it is spread, so that only the direction within that pattern
  differs from ``remove_aligned``'s.

With ``on_support=True`` both the norm and the direction are taken as
``remove_aligned(on_support=True)`` takes them: ``s = |<g, r'>| / ||r'||`` with
``r' = r ⊙ 1[g != 0]``, and ``u`` restricted to the same support (for
``"sign_permuted"``, the signs of ``r'`` permuted), so nothing is written where
``g`` is exactly zero.

``u`` is a fresh draw at every update (``"gaussian"``: one ``torch.randn`` on
the gradients' device, in their dtype, at least float32; ``"sign_permuted"``:
one ``torch.randperm`` per tensor), normalised per group, from a
``torch.Generator`` seeded with the state's ``key`` and
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
from typing import Literal, NamedTuple

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
    restrict_to_support,
    subtract_along,
    to_scope,
    zeros_for,
)
from gradlens.transforms._random import mix_seed
from gradlens.transforms.base import GradientTransform, Scope, State, check_state

__all__ = ["DIRECTIONS", "Direction", "RemoveRandomState", "remove_random"]

Direction = Literal["gaussian", "sign_permuted"]
DIRECTIONS: tuple[Direction, ...] = ("gaussian", "sign_permuted")
"""The kinds of random direction of :func:`remove_random`."""


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
    seed: int,
    scope: Scope = "global",
    only_positive: bool = False,
    *,
    direction: Direction = "gaussian",
    on_support: bool = False,
) -> GradientTransform:
    """Subtract, along a random direction, a vector of the norm ``remove_aligned`` would remove.

    ``remove_random(seed, direction="sign_permuted", on_support=True)`` is the
    matched-support control of ``remove_aligned(on_support=True)``.

    Args:
        seed: The random key (an int ``>= 0``); the whole sequence of
            directions follows from it.
        scope: ``"global"`` for one direction and one norm over all
            parameters, ``"layer"`` for one of each per layer.
        only_positive: Act only where ``<g, r> > 0``, as ``remove_aligned(only_positive=True)``.
        direction: ``"gaussian"`` (isotropic) or ``"sign_permuted"`` (the
            reference with the signs of its nonzero entries permuted within
            each parameter tensor).
        on_support: Remove the norm ``remove_aligned(on_support=True)``
            removes, along a direction restricted to the gradient's support
            (exact zeros of ``g`` are outside it).

    Returns:
        A :class:`~gradlens.transforms.GradientTransform` with state
        :class:`RemoveRandomState`. Its update keeps the keys, shapes and
        dtypes of ``grads``.

    Raises:
        ValueError: For a negative ``seed``, an unknown ``scope`` or ``direction``.
        GradlensError: From ``update`` under ``torch.func.vmap``, naming the fix.
    """
    check_options(0.0, scope)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")

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
        target, onto = reference, before
        if on_support:
            target = restrict_to_support(grads, reference)
            onto = layer_stats(grads, reference=target, scope=scope)
        acted = onto.ref_sq_norm > 0
        if only_positive:
            acted = acted & (onto.coef > 0)
        removed = torch.where(acted, safe_divide(onto.dot.abs(), onto.ref_norm), 0.0)
        if direction == "gaussian":
            u = _gaussian(grads, state.key, state.count)
            if on_support:
                u = restrict_to_support(grads, u)
        else:
            u = _sign_permuted(target, state.key, state.count)
        along = layer_stats(grads, reference=u, scope=scope)
        side = torch.where(along.dot < 0, -1.0, 1.0).to(removed.dtype)
        amount = safe_divide(removed * side, along.ref_norm)
        new_grads = subtract_along(grads, u, groups, amount)
        after = layer_stats(
            new_grads, reference=reference, scope=scope, ref_sq_norm=before.ref_sq_norm
        )
        new_state = RemoveRandomState(
            key=state.key,
            count=state.count + 1,
            cosine_before=to_scope(before.cosine, scope),
            cosine_after=to_scope(cosine_after(after, before), scope),
            coef=to_scope(onto.coef, scope),
            removed_norm=to_scope(removed, scope),
            acted=to_scope(acted.to(removed.dtype), scope),
        )
        return new_grads, new_state

    return GradientTransform(init, update)


def _generator(values: list[Tensor], key: Tensor, count: Tensor) -> torch.Generator:
    """A generator on ``values``' device seeded from ``(key, count)``; refused under vmap."""
    if any(torch._C._functorch.is_functorch_wrapped_tensor(v) for v in [*values, key]):
        raise GradlensError(
            "remove_random draws its directions with a torch.Generator, which torch.func.vmap "
            "cannot batch. For models stacked along a leading axis use "
            "per_model(remove_random(...), vectorize=False)."
        )
    generator = torch.Generator(device=values[0].device)
    generator.manual_seed(mix_seed(int(key), int(count)))
    return generator


def _sign_permuted(
    reference: Mapping[str, Tensor], key: Tensor, count: Tensor
) -> dict[str, Tensor]:
    """``reference`` with the signs of its nonzero entries permuted within each tensor.

    One ``torch.randperm`` per tensor, in key order, from ``(key, count)``. The
    magnitudes and the zeros stay where they are, so the norm and support do too.
    """
    values = list(reference.values())
    generator = _generator(values, key, count)
    out = {}
    for name, r in reference.items():
        flat = r.reshape(-1)
        where = (flat != 0).nonzero().squeeze(-1)
        perm = torch.randperm(where.numel(), generator=generator, device=r.device)
        signs = flat.sign()
        signs[where] = signs[where[perm]]
        out[name] = (flat.abs() * signs).reshape(r.shape)
    return out


def _gaussian(grads: Mapping[str, Tensor], key: Tensor, count: Tensor) -> dict[str, Tensor]:
    """Standard-normal draws shaped like ``grads``, from ``(key, count)``, in ``grads``' order.

    One ``torch.randn`` of all entries, in key order, then split by parameter.
    """
    values = list(grads.values())
    generator = _generator(values, key, count)
    first = values[0]
    dtype = torch.promote_types(first.dtype, torch.float32)
    sizes = [g.numel() for g in values]
    flat = torch.randn(sum(sizes), generator=generator, dtype=dtype, device=first.device)
    parts = flat.split(sizes)
    return {
        name: part.reshape(g.shape).to(g)
        for (name, g), part in zip(grads.items(), parts, strict=True)
    }
