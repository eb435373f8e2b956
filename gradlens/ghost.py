"""Per-example inner products and norms without per-example gradients.

For an ``nn.Linear`` layer with input activations ``a`` of shape
``(example, token, d_in)`` (``token`` = 1 for 2-D inputs) and output gradients
``b = dloss_i / dz`` of shape ``(example, token, d_out)``, example ``i``'s weight
gradient is ``G_i = sum_t b_it a_it^T``. So, for a reference ``R``,

- ``<G_i, R> = sum_t b_it^T R a_it``, and
- ``||G_i||^2 = sum_{t,s} (a_it . a_is)(b_it . b_is)``

(Goodfellow 2015; Li et al. 2021, "ghost clipping"). Both come from the
activations and output gradients of one ordinary forward and backward pass, so
the ``example x parameter`` matrix is never built. Parameters of other layers,
and linear layers that are called more than once or see inputs of another
shape, fall back to ``vmap`` per-example gradients, reduced chunk by chunk.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    >>> ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    >>> loss = torch.nn.functional.cross_entropy
    >>> dots, sq_norms = per_example_dots(model, loss, ref, x, y)
    >>> tuple(dots["0.weight"].shape), tuple(sq_norms["2.bias"].shape)
    ((6,), (6,))
    >>> dots_v, _ = per_example_dots(model, loss, ref, x, y, method="vmap")
    >>> torch.allclose(dots["0.weight"], dots_v["0.weight"], atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from einops import einsum
from torch import Tensor, nn
from torch.func import functional_call

from gradlens.errors import UnsupportedModelError
from gradlens.gradops import check_compatible
from gradlens.per_example import (
    LossFn,
    Randomness,
    check_vmap_compatible,
    per_example_grads,
    per_example_losses,
    split_params,
)

__all__ = ["Method", "Probe", "per_example_dots", "probe_batch"]

Method = Literal["auto", "ghost", "vmap"]


@dataclass
class _Capture:
    """What one linear layer saw during the forward pass."""

    calls: int = 0
    activations: Tensor | None = None
    outputs: Tensor | None = None
    shapes_ok: bool = True
    names: list[str] = field(default_factory=list)


@contextmanager
def _capture_linear(
    model: nn.Module, wanted: Collection[str], batch: int
) -> Iterator[dict[str, _Capture]]:
    """Record inputs and outputs of the linear layers owning ``wanted`` params.

    Hooks live only inside the ``with`` block and are removed even on error.
    """
    captures: dict[str, _Capture] = {}
    handles = []

    def make_hook(capture: _Capture) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            capture.calls += 1
            x = args[0]
            capture.shapes_ok &= x.ndim in (2, 3) and x.shape[0] == batch
            capture.activations = x.detach()
            capture.outputs = output

        return hook

    for module_name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        prefix = f"{module_name}." if module_name else ""
        names = [prefix + p for p, _ in module.named_parameters(recurse=False)]
        names = [n for n in names if n in wanted]
        if names:
            captures[module_name] = _Capture(names=names)
            handles.append(module.register_forward_hook(make_hook(captures[module_name])))
    try:
        yield captures
    finally:
        for handle in handles:
            handle.remove()


def _as_tokens(x: Tensor) -> Tensor:
    """View ``(example, d)`` as ``(example, 1, d)``; keep ``(example, token, d)``."""
    return x.unsqueeze(1) if x.ndim == 2 else x


def _linear_dots(
    a: Tensor, b: Tensor, names: list[str], reference: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Ghost inner products and squared norms of one linear layer's parameters.

    Args:
        a: Input activations, shape ``(example, token, d_in)``.
        b: Gradients of each example's loss w.r.t. the outputs, ``(example, token, d_out)``.
        names: The layer's selected parameter names (``*.weight`` and/or ``*.bias``).
        reference: Reference gradient holding those names.

    Returns:
        ``(dots, sq_norms)``, each name -> shape ``(example,)``.
    """
    dots: dict[str, Tensor] = {}
    sq_norms: dict[str, Tensor] = {}
    tokens, d_in, d_out = a.shape[1], a.shape[2], b.shape[2]
    for name in names:
        if name.endswith("bias"):
            summed = b.sum(dim=1)
            dots[name] = summed @ reference[name]
            sq_norms[name] = summed.pow(2).sum(dim=1)
            continue
        dots[name] = einsum(b @ reference[name], a, "e t i, e t i -> e")
        if tokens == 1:
            sq_norms[name] = a.pow(2).sum(dim=(1, 2)) * b.pow(2).sum(dim=(1, 2))
        elif tokens * tokens <= d_in * d_out:
            gram_a = einsum(a, a, "e t i, e s i -> e t s")
            gram_b = einsum(b, b, "e t o, e s o -> e t s")
            sq_norms[name] = (gram_a * gram_b).sum(dim=(1, 2))
        else:
            sq_norms[name] = einsum(b, a, "e t o, e t i -> e o i").pow(2).sum(dim=(1, 2))
    return dots, sq_norms


def _vmap_dots(
    model: nn.Module,
    loss_fn: LossFn,
    reference: Mapping[str, Tensor],
    inputs: Tensor,
    targets: tuple[Tensor, ...],
    names: list[str],
    chunk_size: int | None,
    randomness: Randomness,
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
        )
        for name, g in grads.items():
            flat = g.flatten(start_dim=1)
            dots[name].append(flat @ reference[name].reshape(-1))
            sq_norms[name].append(flat.pow(2).sum(dim=1))
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
    """

    losses: Tensor
    grad: dict[str, Tensor]
    dots: dict[str, Tensor]
    sq_norms: dict[str, Tensor]


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
    with_grad: bool,
) -> Probe:
    """Shared body of :func:`per_example_dots` and :func:`probe_batch`."""
    if method not in ("auto", "ghost", "vmap"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'vmap', not {method!r}.")
    check_vmap_compatible(model, randomness)
    selected, frozen = split_params(model, params)
    check_compatible(selected, reference, what="model parameters and reference")
    names = list(selected)
    if method == "vmap":
        losses = torch.empty(0)
        if with_grad:
            with torch.no_grad():
                outputs = functional_call(
                    model, (selected, frozen, dict(model.named_buffers())), (inputs,)
                )
                losses = per_example_losses(loss_fn, outputs, *targets)
        dots, sq_norms, grad_sum = {}, {}, {}
    else:
        losses, grad_sum, dots, sq_norms = _ghost_pass(
            model, loss_fn, reference, inputs, targets, selected, frozen, with_grad=with_grad
        )
    rest = [n for n in names if n not in dots]
    if method == "ghost" and rest:
        raise UnsupportedModelError(
            f"parameters {rest} have no factored (ghost) form: only nn.Linear layers called "
            "once per forward on inputs (example, d) or (example, token, d) have one. Use "
            "method='auto' to fall back to vmap for them."
        )
    if rest:
        more = _vmap_dots(model, loss_fn, reference, inputs, targets, rest, chunk_size, randomness)
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
    )


def per_example_dots(
    model: nn.Module,
    loss_fn: LossFn,
    reference: Mapping[str, Tensor],
    inputs: Tensor,
    *targets: Tensor,
    params: Collection[str] | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-example inner products with a reference gradient, and squared norms.

    For every example ``i`` and parameter ``p``: ``<g_i[p], reference[p]>`` and
    ``||g_i[p]||^2``, where ``g_i`` is the gradient of ``loss_fn`` on example
    ``i`` as a batch of one (as in :func:`~gradlens.per_example_grads`).

    Args:
        model: The model; BatchNorm must be in eval mode.
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch.
        reference: Gradient dict with exactly the selected parameter names.
        inputs: Shape ``(example, ...)``.
        *targets: Each of shape ``(example, ...)``.
        params: Parameter names; default all that require grad.
        method: ``"ghost"`` uses the factored form for every parameter and
            raises if one has none; ``"vmap"`` materialises per-example
            gradients; ``"auto"`` uses the factored form where it exists and
            ``vmap`` elsewhere.
        chunk_size: Examples per chunk on the ``vmap`` path.
        randomness: ``vmap`` randomness choice (dropout) on the ``vmap`` path.
            The ghost path draws a mask per example, like ``"different"``.

    Returns:
        ``(dots, sq_norms)``: for every selected name, shape ``(example,)``.

    Raises:
        GradientMismatchError: If ``reference`` does not match the selected parameters.
        UnsupportedModelError: If the model cannot be probed per example, or
            ``method="ghost"`` meets a parameter without a factored form.
    """
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
        with_grad=False,
    )
    return found.dots, found.sq_norms


def probe_batch(
    model: nn.Module,
    loss_fn: LossFn,
    reference: Mapping[str, Tensor],
    inputs: Tensor,
    *targets: Tensor,
    params: Collection[str] | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Probe:
    """Losses, mean gradient, and per-example dots and norms, from one pass.

    The training-loop companion of :func:`per_example_dots`: the backward pass
    that yields the ghost quantities also yields the batch gradient, so a
    probed training step needs no second backward. Arguments as in
    :func:`per_example_dots`.

    Returns:
        A :class:`Probe`.
    """
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
    *,
    with_grad: bool,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One forward and one backward; ghost values for the eligible linear layers.

    Returns:
        ``(losses, grad_sum, dots, sq_norms)``: per-example losses ``(example,)``;
        with ``with_grad`` the sum over examples of the per-example gradients of
        every selected parameter (else empty); dots and squared norms of the
        eligible layers' parameters.
    """
    batch = inputs.shape[0]
    params = {n: p.requires_grad_() for n, p in selected.items()}
    buffers = dict(model.named_buffers())
    with torch.enable_grad(), _capture_linear(model, params, batch) as captures:
        outputs = functional_call(model, (params, frozen, buffers), (inputs,))
        losses = per_example_losses(loss_fn, outputs, *targets)
    eligible = {
        name: c
        for name, c in captures.items()
        if c.calls == 1 and c.shapes_ok and c.outputs is not None and c.outputs.requires_grad
    }
    wrt = [c.outputs for c in eligible.values()] + (list(params.values()) if with_grad else [])
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
    for capture, b in zip(eligible.values(), output_grads, strict=True):
        assert capture.activations is not None and capture.outputs is not None
        if b is None:
            b = torch.zeros_like(capture.outputs)
        more = _linear_dots(
            _as_tokens(capture.activations), _as_tokens(b), capture.names, reference
        )
        dots.update(more[0])
        sq_norms.update(more[1])
    return losses.detach(), grad_sum, dots, sq_norms
