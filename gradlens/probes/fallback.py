"""The ``vmap`` fallback of the ghost path: dots and norms from per-example gradients.

Parameters without an established factored form (:mod:`gradlens.probes.plan`)
get their per-example dots, squared norms and gradient sums here, chunk by
chunk; :func:`refuse_mixed_masks` keeps one step from mixing the batch
forward's random masks with per-example ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gradlens.compiling import compiled
from gradlens.errors import UnsupportedModelError
from gradlens.probes.batch import examples, take
from gradlens.probes.outputs import OutputSelector
from gradlens.probes.plan import PlanEntry
from gradlens.probes.precision import upcast
from gradlens.probes.vmap import LossFn, Randomness, per_example_grads

__all__ = ["refuse_mixed_masks", "vmap_dots"]


def vmap_dots(
    model: nn.Module,
    loss_fn: LossFn,
    reference: Mapping[str, Tensor],
    inputs: Tensor,
    targets: tuple[Tensor, ...],
    names: list[str],
    chunk_size: int | None,
    randomness: Randomness,
    output: OutputSelector | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Inner products, squared norms and gradient sums from per-example gradients.

    Examples are processed ``chunk_size`` at a time and reduced at once, so at
    most ``chunk_size x parameter`` gradient entries exist at any moment. The
    reductions run in the references' dtype (float32 for a bfloat16 model: the
    per-example gradients are upcast first) with autocast off.
    ``reference`` holds stacked references, ``(reference, *param)``; the dots
    have shape ``(example, reference)``.
    """
    step = chunk_size or examples(inputs)
    dots: dict[str, list[Tensor]] = {n: [] for n in names}
    sq_norms: dict[str, list[Tensor]] = {n: [] for n in names}
    grad_sum: dict[str, Tensor] = {}
    for start in range(0, examples(inputs), step):
        chunk = slice(start, start + step)
        grads = per_example_grads(
            model,
            loss_fn,
            take(inputs, chunk),
            *(t[chunk] for t in targets),
            params=names,
            randomness=randomness,
            output=output,
        )
        with torch.autocast(next(iter(grads.values())).device.type, enabled=False):
            found = _reduce(grads, {n: reference[n] for n in grads})
        for name, (d, sq, total) in found.items():
            dots[name].append(d)
            sq_norms[name].append(sq)
            grad_sum[name] = total + grad_sum.get(name, 0.0)
    return (
        {n: torch.cat(v) for n, v in dots.items()},
        {n: torch.cat(v) for n, v in sq_norms.items()},
        grad_sum,
    )


@compiled("vmap")
def _reduce(
    grads: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Each parameter's dots ``(example, reference)``, squared norms ``(example,)`` and sum.

    ``grads`` holds a chunk's per-example gradients, ``(example, *param)``;
    ``reference`` the stacked references in the accumulation dtype (float32 for
    bfloat16: the gradients are upcast first), ``(reference, *param)``.
    """
    found = {}
    for name, g in grads.items():
        refs = reference[name]
        flat = upcast(g, refs.dtype).flatten(start_dim=1)
        found[name] = (
            flat @ refs.reshape(refs.shape[0], -1).T,
            torch.linalg.vector_norm(flat, dim=1).square(),
            flat.sum(dim=0).view(g.shape[1:]),
        )
    return found


def refuse_mixed_masks(plan: Mapping[str, PlanEntry], randomness: Randomness, method: str) -> None:
    """Refuse a plan that would take one step's dots from two sets of random masks.

    With random draws in the forward (``randomness`` other than ``"error"``:
    dropout in training mode), the ghost path's dots and batch gradient come
    from the batch forward's masks and the ``vmap`` path's from masks drawn per
    example: a plan with both would mix them.
    """
    if randomness == "error" or method != "auto":
        return
    ghost = [n for n, e in plan.items() if e.path == "ghost"]
    other = [n for n, e in plan.items() if e.path != "ghost"]
    if ghost and other:
        shown = other if len(other) <= 4 else [*other[:4], f"... {len(other) - 4} more"]
        raise UnsupportedModelError(
            f"with randomness={randomness!r} (random draws in the forward, dropout say), the "
            f"parameters on the ghost path get their dots from the batch forward's masks and "
            f"{shown} (on vmap) from masks drawn per example: one step would mix two sets of "
            "masks. Pass method='vmap' (every gradient and dot from the per-example masks), "
            "or make the forward deterministic (model.eval())."
        )
