"""Per-example inner products and norms without per-example gradients.

For an ``nn.Linear`` layer with input activations ``a_it`` and output gradients
``b_it = dloss_i / dz_it`` (example ``i``, token ``t``), example ``i``'s weight
gradient is ``G_i = sum_t b_it a_it^T``. So, for a reference ``R``,

- ``<G_i, R> = sum_t b_it^T R a_it``, and
- ``||G_i||^2 = sum_{t,s} (a_it . a_is)(b_it . b_is)``

(Goodfellow 2015; Li et al. 2021, "ghost clipping"; shapes, the bias and the
cost of each form in :mod:`gradlens.probes.forms.linear`). Convolutions, embeddings,
HF ``Conv1D`` and the affine parameters of normalisations have factored forms
of their own (the registry in :mod:`gradlens.probes.forms.registry`). All come from the
inputs and output gradients of one ordinary forward and backward pass, so
the ``example x parameter`` matrix is never built, and ``K`` references cost
``K`` inner products, not ``K`` passes. Which parameters may go this way is
established, not inferred from sizes, by :func:`ghost_plan` (the example axis of
each captured input, every use of each parameter, and a check that the forward
does not mix examples; see :mod:`gradlens.probes.plan`). The others fall back to
``vmap`` per-example gradients, reduced chunk by chunk.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    >>> ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    >>> loss = torch.nn.functional.cross_entropy
    >>> dots, sq_norms = per_example_dots(model, loss, x, y, reference=ref)
    >>> tuple(dots["0.weight"].shape), tuple(sq_norms["2.bias"].shape)
    ((6,), (6,))
    >>> dots_v, _ = per_example_dots(model, loss, x, y, reference=ref, method="vmap")
    >>> torch.allclose(dots["0.weight"], dots_v["0.weight"], atol=1e-5)
    True
    >>> teacher = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    >>> refs = {"trait": ref, "teacher": teacher}
    >>> dots_k, _ = per_example_dots(model, loss, x, y, references=refs)
    >>> tuple(dots_k["0.weight"].shape)  # (example, reference), in the order of refs
    (6, 2)
    >>> torch.allclose(dots_k["0.weight"][:, 0], dots["0.weight"], atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from gradlens.alignment.gradops import check_compatible
from gradlens.errors import UnsupportedModelError
from gradlens.numerics import accumulation_dtype
from gradlens.probes.batch import call, examples
from gradlens.probes.capture import ghost_pass
from gradlens.probes.checks import check_mean_loss
from gradlens.probes.fallback import refuse_mixed_masks, vmap_dots
from gradlens.probes.loop import loop_reason
from gradlens.probes.outputs import OutputSelector, plain_forward, select_output
from gradlens.probes.plan import PlanEntry, cheapest, ghost_plan, plan_for
from gradlens.probes.precision import batch_cosines, reduced_dtype, warn_within_noise
from gradlens.probes.vmap import (
    LossFn,
    Randomness,
    check_chunk_size,
    check_vmap_compatible,
    per_example_losses,
    split_params,
)

__all__ = ["Method", "PlanEntry", "Probe", "ghost_plan", "per_example_dots", "probe_batch"]

Method = Literal["auto", "ghost", "vmap"]


References = Mapping[str, Mapping[str, Tensor]]
"""Named reference gradients: reference name -> gradient dict."""


def _stack_references(
    selected: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | None,
    references: References | None,
) -> tuple[dict[str, Tensor], tuple[str, ...] | None]:
    """Each parameter's references stacked, ``(reference, *param)``, and their names.

    Returns:
        ``(stacked, names)``; ``names`` is ``None`` for a single ``reference``.

    Raises:
        ValueError: Unless exactly one of ``reference`` and ``references`` is given.
        GradientMismatchError: If a reference does not match the selected parameters.
    """
    if (reference is None) == (references is None):
        raise ValueError(
            "give exactly one of reference= (one gradient dict) and references= "
            "(name -> gradient dict, for several at once)."
        )
    if reference is not None:
        check_compatible(selected, reference, what="model parameters and reference")
        return {n: _like(reference[n], p).unsqueeze(0) for n, p in selected.items()}, None
    assert references is not None
    if not references:
        raise ValueError("references= needs at least one named reference gradient.")
    for key, ref in references.items():
        check_compatible(selected, ref, what=f"model parameters and references[{key!r}]")
    stacked = {
        n: torch.stack([_like(ref[n], p) for ref in references.values()])
        for n, p in selected.items()
    }
    return stacked, tuple(references)


def _like(reference: Tensor, param: Tensor) -> Tensor:
    """A reference on its parameter's device, in the dtype its dots accumulate in.

    float32 for a bfloat16 or float16 parameter, else the parameter's dtype.
    """
    return reference.to(device=param.device, dtype=accumulation_dtype(param.dtype))


class Probe(NamedTuple):
    """What one pass over a batch tells about its examples' gradients.

    Attributes:
        losses: Each example's loss, shape ``(example,)``.
        grad: The mean over examples of the per-example gradients (for a
            mean-reduced loss, the ordinary batch gradient); name -> param shape.
        dots: ``<g_i[p], reference[p]>``, name -> ``(example,)``; with
            ``references=``, name -> ``(example, reference)``.
        sq_norms: ``||g_i[p]||^2``, name -> ``(example,)``.
        plan: The path each parameter took and why, name -> :class:`PlanEntry`
            (as from :func:`ghost_plan`; empty for a batch without examples).
        references: The names along the ``reference`` axis of ``dots``, in
            order (the keys of ``references=``); ``None`` with ``reference=``.

    A batch without examples gives ``(0,)`` values and a zero ``grad`` (the
    mean of no gradients, taken as no step rather than NaN).
    """

    losses: Tensor
    grad: dict[str, Tensor]
    dots: dict[str, Tensor]
    sq_norms: dict[str, Tensor]
    plan: dict[str, PlanEntry]
    references: tuple[str, ...] | None = None


def _probe(
    model: nn.Module,
    loss_fn: LossFn,
    reference: Mapping[str, Tensor] | None,
    references: References | None,
    inputs: Tensor,
    targets: tuple[Tensor, ...],
    *,
    params: Collection[str] | None,
    method: Method,
    chunk_size: int | None,
    randomness: Randomness,
    output: OutputSelector | None,
    with_grad: bool,
) -> Probe:
    """Shared body of :func:`per_example_dots` and :func:`probe_batch`."""
    if method not in ("auto", "ghost", "vmap"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'vmap', not {method!r}.")
    check_chunk_size(chunk_size)
    check_vmap_compatible(model, randomness)
    selected, frozen = split_params(model, params)
    stacked, ref_names = _stack_references(selected, reference, references)
    names = list(selected)
    if examples(inputs) == 0:
        return _empty_probe(selected, stacked, ref_names, with_grad=with_grad)
    plan = plan_for(model, inputs, selected, frozen, randomness, output)  # + the mixing check
    if method == "vmap":
        plan = {n: PlanEntry("vmap", "method='vmap'") for n in names}
    elif method == "auto":  # vmap for all where the cost model says it is cheaper
        plan = cheapest(plan)
        if all(e.path == "vmap" for e in plan.values()):
            method = "vmap"
    refused = [f"{n!r} ({e.reason})" for n, e in plan.items() if e.path != "ghost"]
    if method == "ghost" and refused:
        raise UnsupportedModelError(
            f"parameters without an exact ghost form: {'; '.join(refused)}. The ghost path "
            "takes parameters that reach the examples through a factored form (the weight or "
            "bias of a linear, HF Conv1D, conv, embedding or normalisation layer, or a tensor "
            "added to or multiplying the examples: position tables, class tokens, RMSNorm "
            "weights), on inputs with an established example axis; use method='auto' to send "
            "the others to vmap (ghost_plan shows the plan and each parameter's reason)."
        )
    refuse_mixed_masks(plan, randomness, method)
    if method == "vmap":
        losses = torch.empty(0)
        if with_grad:
            with torch.no_grad():
                outputs = call(model, (selected, frozen, dict(model.named_buffers())), inputs)
                losses = per_example_losses(loss_fn, outputs, *targets, output=output)
                check_mean_loss(loss_fn(select_output(outputs, output), *targets), losses)
        dots, sq_norms, grad_sum = {}, {}, {}
    else:
        losses, grad_sum, dots, sq_norms = ghost_pass(
            model,
            loss_fn,
            stacked,
            inputs,
            targets,
            selected,
            frozen,
            plan,
            output=output,
            with_grad=with_grad,
            check_rows=randomness == "error",
        )
    rest = [n for n in names if n not in dots]
    for name in rest:
        if plan[name].path == "ghost":  # the forward did not do what its trace did
            plan[name] = PlanEntry("vmap", "the forward differed from its traced plan")
    if method == "ghost" and rest:
        raise UnsupportedModelError(
            f"parameters {rest} were planned for the ghost path but the forward differed from "
            "its trace (a forward that depends on the data?); use method='auto'."
        )
    if rest and method == "auto":
        refuse_mixed_masks(plan, randomness, method)
    if rest:
        plan = _loop_noted(model, plan, rest)
        more = vmap_dots(
            model, loss_fn, stacked, inputs, targets, rest, chunk_size, randomness, output
        )
        dots.update(more[0])
        sq_norms.update(more[1])
        if method == "vmap":
            grad_sum = more[2]
    count = examples(inputs)
    grad = {n: (grad_sum[n] / count).to(selected[n].dtype) for n in names} if with_grad else {}
    low = reduced_dtype(selected) if with_grad else None
    if low is not None:  # one host sync, only in reduced precision
        warn_within_noise(batch_cosines(grad, stacked), low)
    return Probe(
        losses=losses,
        grad=grad,
        dots={n: dots[n] if ref_names else dots[n][:, 0] for n in names},
        sq_norms={n: sq_norms[n] for n in names},
        plan=plan,
        references=ref_names,
    )


def _loop_noted(
    model: nn.Module, plan: dict[str, PlanEntry], rest: list[str]
) -> dict[str, PlanEntry]:
    """The plan with each per-example-gradient entry saying so when a loop takes them."""
    why = loop_reason(model)
    if why is None:
        return plan
    noted = dict(plan)
    for name in rest:
        noted[name] = plan[name]._replace(reason=f"{plan[name].reason}; {why}")
    return noted


def _empty_probe(
    selected: dict[str, Tensor],
    stacked: dict[str, Tensor],
    ref_names: tuple[str, ...] | None,
    *,
    with_grad: bool,
) -> Probe:
    """The probe of a batch without examples: empty values, a zero mean gradient."""
    empty = {n: p.new_zeros(0) for n, p in selected.items()}
    dots = {n: p.new_zeros(0, stacked[n].shape[0]) for n, p in selected.items()}
    return Probe(
        losses=next(iter(selected.values())).new_zeros(0),
        grad={n: torch.zeros_like(p) for n, p in selected.items()} if with_grad else {},
        dots=dots if ref_names else empty,
        sq_norms=dict(empty),
        plan={},
        references=ref_names,
    )


def per_example_dots(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    *targets: Tensor,
    reference: Mapping[str, Tensor] | None = None,
    references: References | None = None,
    params: Collection[str] | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    output: OutputSelector | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-example inner products with a reference gradient, and squared norms.

    For every example ``i`` and parameter ``p``: ``<g_i[p], reference[p]>`` and
    ``||g_i[p]||^2``, where ``g_i`` is the gradient of ``loss_fn`` on example
    ``i`` as a batch of one (as in :func:`~gradlens.per_example_grads`).

    Args:
        model: The model; BatchNorm must be in eval mode.
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch.
        inputs: Shape ``(example, ...)``.
        *targets: Each of shape ``(example, ...)``.
        reference: Gradient dict with exactly the selected parameter names
            (keyword-only, as everywhere in gradlens).
        references: Instead of ``reference``, several at once: name -> gradient
            dict (e.g. ``{"trait": g_t, "teacher": theta_T - theta_0}``), all
            from one forward and backward; the dots then gain a ``reference``
            axis in the order of its keys.
        params: Parameter names; default all that require grad.
        method: ``"ghost"`` uses the factored form for every parameter and
            raises, naming each parameter and why, if one has none;
            ``"vmap"`` materialises per-example gradients; ``"auto"`` follows
            :func:`ghost_plan`: the factored form where it is established
            exact, ``vmap`` elsewhere.
        chunk_size: Examples per chunk on the ``vmap`` path.
        randomness: ``vmap`` randomness choice (dropout) on the ``vmap`` path.
            The ghost path draws a mask per example, like ``"different"``.
        output: Which tensor of the model's return value the loss sees, for a
            model that returns a ``ModelOutput``, dict or tuple (``"logits"``,
            a tuple index, or a callable); see
            :func:`~gradlens.per_example_grads`. ``config.use_cache`` is
            switched off during the call.

    Returns:
        ``(dots, sq_norms)``: for every selected name, shape ``(example,)``
        (``(0,)`` for a batch without examples); with ``references=`` the dots
        have shape ``(example, reference)``. In the parameter's accumulation
        dtype: float32 for bfloat16/float16 parameters and under autocast
        (:mod:`gradlens.probes.precision`), float64 for float64.

    Raises:
        GradientMismatchError: If ``reference`` does not match the selected parameters.
        UnsupportedModelError: If the model cannot be probed per example (its
            forward mixes examples, for one), or ``method="ghost"`` meets a
            parameter without an exact factored form.
        ValueError: If ``chunk_size`` is zero or negative, or not exactly one of
            ``reference`` and ``references`` is given.
    """
    with plain_forward(model):
        found = _probe(
            model,
            loss_fn,
            reference,
            references,
            inputs,
            targets,
            params=params,
            method=method,
            chunk_size=chunk_size,
            randomness=randomness,
            output=output,
            with_grad=False,
        )
    return found.dots, found.sq_norms


def probe_batch(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    *targets: Tensor,
    reference: Mapping[str, Tensor] | None = None,
    references: References | None = None,
    params: Collection[str] | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    output: OutputSelector | None = None,
) -> Probe:
    """Losses, mean gradient, and per-example dots and norms, from one pass.

    The training-loop companion of :func:`per_example_dots`: the backward pass
    that yields the ghost quantities also yields the batch gradient, so a
    probed training step needs no second backward. Arguments as in
    :func:`per_example_dots`. In reduced precision (autocast, bfloat16 or
    float16 parameters), a batch cosine ``|cos(grad, reference)|`` below the
    measured noise floor issues a :class:`~gradlens.errors.PrecisionWarning`.

    Returns:
        A :class:`Probe`.
    """
    with plain_forward(model):
        return _probe(
            model,
            loss_fn,
            reference,
            references,
            inputs,
            targets,
            params=params,
            method=method,
            chunk_size=chunk_size,
            randomness=randomness,
            output=output,
            with_grad=True,
        )
