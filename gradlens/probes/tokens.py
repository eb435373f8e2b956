"""Token-level alignment: each token's loss term against a reference gradient, in one pass.

For a sequence model whose example loss is a sum of per-token terms,
``l_i = sum_t l_{i,t}`` (:func:`~gradlens.training.losses.token_losses`, the
terms of ``token_mean`` with either weighting),

    ``d_{i,t} = <grad l_{i,t}, r>``

is how much learning token ``t`` of example ``i`` moves the parameters along
the reference ``r`` (the trait gradient ``g_t``): its sum over tokens is the
example's dot ``<grad l_i, r>``, exactly the per-example dot the probes give.
All ``d_{i,t}`` come from one forward-mode derivative of the per-token losses
along ``r`` (``torch.func.jvp``), example by example under ``vmap``: a small
constant multiple of a forward's cost, whatever the number of tokens (a loop
takes a backward per token). Per-token
gradient norms would need every token's gradient (a backward per token) and
are not computed, so there is no per-token cosine; divide by the example's
norm (``probe_batch(...).sq_norms``) for a per-token share of its cosine.

Forward mode has no formula for the fused attention kernels, so attention
runs on PyTorch's math backend (``SDPBackend.MATH``) inside the call: exact,
with the ``(token, token)`` score matrix materialised per head.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from gradlens.training.losses import token_losses
    >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    >>> ids = torch.randint(0, 10, (3, 5))
    >>> ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    >>> d = token_dots(model, token_losses, ids, ids, reference=ref)
    >>> tuple(d.shape)  # (example, token); position 0 predicts nothing
    (3, 5)
    >>> float(d[:, 0].abs().max())
    0.0
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradlens.alignment.gradops import check_compatible
from gradlens.probes.batch import Inputs, call, examples, take, unsqueeze
from gradlens.probes.checks import (
    LossFn,
    check_batch,
    check_chunk_size,
    check_vmap_compatible,
    explain_vmap_failures,
    split_params,
)
from gradlens.probes.outputs import OutputSelector, plain_forward, select_output

__all__ = ["token_dots", "token_dots_and_losses"]


def token_dots(
    model: nn.Module,
    token_loss_fn: LossFn,
    inputs: Inputs,
    *targets: Tensor,
    reference: Mapping[str, Tensor],
    params: Collection[str] | None = None,
    chunk_size: int | None = None,
    output: OutputSelector | None = None,
) -> Tensor:
    """Each token's loss-term gradient dotted with a reference: ``<grad l_{i,t}, reference>``.

    :func:`token_dots_and_losses` also returns the terms ``l_{i,t}`` themselves.

    Example ``i`` is run alone, as a batch of one (as every per-example probe
    does), so a model that pads, masks or mixes nothing across examples gives
    the same values as a loop over examples and tokens.

    Args:
        model: The model; BatchNorm and dropout must be in eval mode.
        token_loss_fn: ``token_loss_fn(outputs, *targets) -> (example, token)``,
            the terms whose sum over ``token`` is each example's loss
            (:func:`~gradlens.training.losses.token_losses`).
        inputs: ``(example, ...)``, or a dict of such tensors (keywords).
        *targets: Each ``(example, ...)``.
        reference: Gradient dict with exactly the selected parameter names.
        params: Parameter names; default all that require grad.
        chunk_size: Examples per ``vmap`` chunk, to bound memory.
        output: Which tensor of the model's return value the loss sees
            (``"logits"`` for a Hugging Face model).

    Returns:
        ``(example, token)``, in the dtype of the per-token losses. Its sum
        over ``token`` is each example's dot with ``reference``.

    Raises:
        UnsupportedModelError: For BatchNorm or dropout in training mode, or a
            model that ``vmap`` cannot batch (naming the module).
        GradientMismatchError: If ``reference`` does not match the selected parameters.
        ValueError: If ``token_loss_fn`` does not return ``(example, token)``.
    """
    return token_dots_and_losses(
        model,
        token_loss_fn,
        inputs,
        *targets,
        reference=reference,
        params=params,
        chunk_size=chunk_size,
        output=output,
    )[0]


def token_dots_and_losses(
    model: nn.Module,
    token_loss_fn: LossFn,
    inputs: Inputs,
    *targets: Tensor,
    reference: Mapping[str, Tensor],
    params: Collection[str] | None = None,
    chunk_size: int | None = None,
    output: OutputSelector | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`token_dots` and the per-token losses it differentiated, from the same pass.

    Returns:
        ``(dots, losses)``, each ``(example, token)``: ``losses`` are the terms
        ``l_{i,t}`` of each example alone (a row sums to the example's loss).
    """
    check_chunk_size(chunk_size)
    check_batch(inputs, targets)
    check_vmap_compatible(model, "error")
    selected, frozen = split_params(model, params)
    check_compatible(selected, dict(reference), what="parameters and reference")
    tangent = {n: reference[n].detach().to(p.device, p.dtype) for n, p in selected.items()}
    buffers = dict(model.named_buffers())

    def terms(p: dict[str, Tensor], x: Inputs, *t: Tensor) -> Tensor:
        found = call(model, (p, frozen, buffers), unsqueeze(x))
        row = token_loss_fn(select_output(found, output), *(ti.unsqueeze(0) for ti in t))
        if row.ndim != 2 or row.shape[0] != 1:
            raise ValueError(
                f"token_loss_fn must return (example, token) per-token loss terms; on one "
                f"example it returned shape {tuple(row.shape)}. Use "
                "training.losses.token_losses, or a loss with reduction='none' per token."
            )
        return row[0]

    def one(x: Inputs, *t: Tensor) -> tuple[Tensor, Tensor]:
        value, dot = jvp(lambda p: terms(p, x, *t), (selected,), (tangent,))
        return dot, value

    if examples(inputs) == 0:
        empty = torch.zeros(0, 0, dtype=next(iter(selected.values())).dtype)
        return empty, empty

    def plain() -> tuple[Tensor, Tensor]:
        return one(take(inputs, 0), *(t[0] for t in targets))

    with (
        warnings.catch_warnings(),
        plain_forward(model),
        sdpa_kernel(SDPBackend.MATH),
        explain_vmap_failures(model, plain),
    ):
        # torch scripts its forward-mode decompositions on first use, through a
        # deprecated API that warns; the warning is torch's, not the caller's.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return vmap(one, chunk_size=chunk_size)(inputs, *targets)
