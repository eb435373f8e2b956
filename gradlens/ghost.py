"""Per-example inner products and norms without per-example gradients.

For an ``nn.Linear`` layer with input activations ``a_it`` and output gradients
``b_it = dloss_i / dz_it`` (example ``i``, token ``t``), example ``i``'s weight
gradient is ``G_i = sum_t b_it a_it^T``. So, for a reference ``R``,

- ``<G_i, R> = sum_t b_it^T R a_it``, and
- ``||G_i||^2 = sum_{t,s} (a_it . a_is)(b_it . b_is)``

(Goodfellow 2015; Li et al. 2021, "ghost clipping"; shapes, the bias and the
cost of each form in :mod:`gradlens._ghost_linear`). Both come from the
activations and output gradients of one ordinary forward and backward pass, so
the ``example x parameter`` matrix is never built. Which parameters may go this
way is established, not inferred from sizes, by :func:`ghost_plan` (the example
axis of each linear input, every use of each parameter, and a check that the
forward does not mix examples; see :mod:`gradlens._ghost_plan`). The others
fall back to ``vmap`` per-example gradients, reduced chunk by chunk.

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
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradlens._ghost_linear import Capture, as_tokens, capture_linear, linear_dots
from gradlens._ghost_plan import PlanEntry, ghost_plan, plan_for
from gradlens._outputs import OutputSelector, no_kv_cache, select_output
from gradlens.errors import UnsupportedModelError
from gradlens.gradops import check_compatible
from gradlens.per_example import (
    LossFn,
    Randomness,
    check_chunk_size,
    check_vmap_compatible,
    per_example_grads,
    per_example_losses,
    split_params,
)

__all__ = ["Method", "PlanEntry", "Probe", "ghost_plan", "per_example_dots", "probe_batch"]

Method = Literal["auto", "ghost", "vmap"]


def _vmap_dots(
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
    most ``chunk_size x parameter`` gradient entries exist at any moment.
    """
    step = chunk_size or inputs.shape[0]
    dots: dict[str, list[Tensor]] = {n: [] for n in names}
    sq_norms: dict[str, list[Tensor]] = {n: [] for n in names}
    grad_sum: dict[str, Tensor] = {}
    for start in range(0, inputs.shape[0], step):
        chunk = slice(start, start + step)
        grads = per_example_grads(
            model,
            loss_fn,
            inputs[chunk],
            *(t[chunk] for t in targets),
            params=names,
            randomness=randomness,
            output=output,
        )
        for name, g in grads.items():
            flat = g.flatten(start_dim=1)
            dots[name].append(flat @ reference[name].reshape(-1))
            sq_norms[name].append(torch.linalg.vector_norm(flat, dim=1).square())
            grad_sum[name] = g.sum(dim=0) + grad_sum.get(name, 0.0)
    return (
        {n: torch.cat(v) for n, v in dots.items()},
        {n: torch.cat(v) for n, v in sq_norms.items()},
        grad_sum,
    )


class Probe(NamedTuple):
    """What one pass over a batch tells about its examples' gradients.

    Attributes:
        losses: Each example's loss, shape ``(example,)``.
        grad: The mean over examples of the per-example gradients (for a
            mean-reduced loss, the ordinary batch gradient); name -> param shape.
        dots: ``<g_i[p], reference[p]>``, name -> ``(example,)``.
        sq_norms: ``||g_i[p]||^2``, name -> ``(example,)``.
        plan: The path each parameter took and why, name -> :class:`PlanEntry`
            (as from :func:`ghost_plan`; empty for a batch without examples).

    A batch without examples gives ``(0,)`` values and a zero ``grad`` (the
    mean of no gradients, taken as no step rather than NaN).
    """

    losses: Tensor
    grad: dict[str, Tensor]
    dots: dict[str, Tensor]
    sq_norms: dict[str, Tensor]
    plan: dict[str, PlanEntry]


def _probe(
    model: nn.Module,
    loss_fn: LossFn,
    reference: Mapping[str, Tensor],
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
    check_compatible(selected, reference, what="model parameters and reference")
    names = list(selected)
    if inputs.shape[0] == 0:
        return _empty_probe(selected, with_grad=with_grad)
    plan = plan_for(model, inputs, selected, frozen, randomness, output)  # + the mixing check
    if method == "vmap":
        plan = {n: PlanEntry("vmap", "method='vmap'") for n in names}
    refused = [f"{n!r} ({e.reason})" for n, e in plan.items() if e.path != "ghost"]
    if method == "ghost" and refused:
        raise UnsupportedModelError(
            f"parameters without an exact ghost form: {'; '.join(refused)}. The ghost path "
            "takes only nn.Linear parameters read once by the forward, on inputs with an "
            "established example axis; use method='auto' to send the others to vmap "
            "(ghost_plan shows the plan)."
        )
    if method == "vmap":
        losses = torch.empty(0)
        if with_grad:
            with torch.no_grad():
                outputs = functional_call(
                    model, (selected, frozen, dict(model.named_buffers())), (inputs,)
                )
                losses = per_example_losses(loss_fn, outputs, *targets, output=output)
        dots, sq_norms, grad_sum = {}, {}, {}
    else:
        losses, grad_sum, dots, sq_norms = _ghost_pass(
            model,
            loss_fn,
            reference,
            inputs,
            targets,
            selected,
            frozen,
            plan,
            output=output,
            with_grad=with_grad,
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
    if rest:
        more = _vmap_dots(
            model, loss_fn, reference, inputs, targets, rest, chunk_size, randomness, output
        )
        dots.update(more[0])
        sq_norms.update(more[1])
        if method == "vmap":
            grad_sum = more[2]
    count = inputs.shape[0]
    return Probe(
        losses=losses,
        grad={n: grad_sum[n] / count for n in names} if with_grad else {},
        dots={n: dots[n] for n in names},
        sq_norms={n: sq_norms[n] for n in names},
        plan=plan,
    )


def _empty_probe(selected: dict[str, Tensor], *, with_grad: bool) -> Probe:
    """The probe of a batch without examples: empty values, a zero mean gradient."""
    empty = {n: p.new_zeros(0) for n, p in selected.items()}
    return Probe(
        losses=next(iter(selected.values())).new_zeros(0),
        grad={n: torch.zeros_like(p) for n, p in selected.items()} if with_grad else {},
        dots=empty,
        sq_norms=dict(empty),
        plan={},
    )


def per_example_dots(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    *targets: Tensor,
    reference: Mapping[str, Tensor],
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
        (``(0,)`` for a batch without examples).

    Raises:
        GradientMismatchError: If ``reference`` does not match the selected parameters.
        UnsupportedModelError: If the model cannot be probed per example (its
            forward mixes examples, for one), or ``method="ghost"`` meets a
            parameter without an exact factored form.
        ValueError: If ``chunk_size`` is zero or negative.
    """
    with no_kv_cache(model):
        found = _probe(
            model,
            loss_fn,
            reference,
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
    reference: Mapping[str, Tensor],
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
    :func:`per_example_dots`.

    Returns:
        A :class:`Probe`.
    """
    with no_kv_cache(model):
        return _probe(
            model,
            loss_fn,
            reference,
            inputs,
            targets,
            params=params,
            method=method,
            chunk_size=chunk_size,
            randomness=randomness,
            output=output,
            with_grad=True,
        )


def _ghost_pass(
    model: nn.Module,
    loss_fn: LossFn,
    reference: Mapping[str, Tensor],
    inputs: Tensor,
    targets: tuple[Tensor, ...],
    selected: dict[str, Tensor],
    frozen: dict[str, Tensor],
    plan: Mapping[str, PlanEntry],
    *,
    output: OutputSelector | None,
    with_grad: bool,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One forward and one backward; ghost values for the parameters planned so.

    The example axis of each captured input and output comes from ``plan``;
    a layer whose capture does not match it (called again, another shape)
    gets no ghost value, so the caller sends it to ``vmap``.

    Returns:
        ``(losses, grad_sum, dots, sq_norms)``: per-example losses ``(example,)``;
        with ``with_grad`` the sum over examples of the per-example gradients of
        every selected parameter (else empty); dots and squared norms of the
        ghost parameters.
    """
    batch = inputs.shape[0]
    params = {n: p.requires_grad_() for n, p in selected.items()}
    buffers = dict(model.named_buffers())
    ghost = [n for n, e in plan.items() if e.path == "ghost"]
    with torch.enable_grad(), capture_linear(model, ghost) as captures:
        outputs = select_output(
            functional_call(model, (params, frozen, buffers), (inputs,)), output
        )
        losses = per_example_losses(loss_fn, outputs, *targets)
    eligible: dict[str, tuple[Capture, int]] = {}
    for module_name, c in captures.items():
        axis = plan[c.names[0]].example_axis
        assert axis is not None
        x = c.activations
        out = c.outputs
        if c.calls == 1 and x is not None and x.ndim > axis and x.shape[axis] == batch:
            if out is None or not out.requires_grad:
                continue
            eligible[module_name] = (c, axis)
    wrt = [c.outputs for c, _ in eligible.values()] + (list(params.values()) if with_grad else [])
    if not wrt:
        return losses.detach(), {}, {}, {}
    with torch.enable_grad():
        found = torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
    output_grads, param_grads = found[: len(eligible)], found[len(eligible) :]
    grad_sum = (
        {
            n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(params.items(), param_grads, strict=True)
        }
        if with_grad
        else {}
    )
    dots: dict[str, Tensor] = {}
    sq_norms: dict[str, Tensor] = {}
    for (capture, axis), b in zip(eligible.values(), output_grads, strict=True):
        assert capture.activations is not None and capture.outputs is not None
        if b is None:
            b = torch.zeros_like(capture.outputs)
        a = as_tokens(capture.activations, axis)
        more = linear_dots(a, as_tokens(b, axis), capture.names, reference)
        dots.update(more[0])
        sq_norms.update(more[1])
    return losses.detach(), grad_sum, dots, sq_norms
