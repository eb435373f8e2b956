"""Ghost form of ``F.embedding`` (private).

Example ``i`` looks up rows ``id_it`` of the table ``W`` and gets output
gradients ``b_it``. Its gradient is ``G_i[v] = sum_{t: id_it = v} b_it``, with
no contribution from ``padding_idx`` (PyTorch gives that row zero gradient), and
repeated ids within an example adding up. So

- ``<G_i, R> = sum_t [id_it != pad] R[id_it] . b_it``, and
- ``||G_i||^2 = sum_v ||G_i[v]||^2``: the ``b_it`` are summed per
  ``(example, id)`` pair (``index_add`` over the unique pairs) and the sums'
  squared norms added per example, ``O(example token d)``, never ``vocab``.

``max_norm`` renormalises, in place and without gradient, each looked-up row
whose norm exceeds it, before the lookup. That is per row: a row is rewritten
the same way whether the batch or one example looks it up, and a rewritten row
is not rewritten again, so the batch's lookups and output gradients are each
example's own, and the form above is exact at the table the forward leaves
(the traces of the plan rewrite the same rows first, as the forward would).
``scale_grad_by_freq`` scales by counts in the batch: no factored form, ``vmap``.
Opacus's embedding sampler ignores ``padding_idx`` (its per-sample gradient of
the padding row is not zero); this form does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.probes.forms.base import Call, Form, Layout, Results, argument, to_examples
from gradlens.probes.forms.shared import Outer

__all__ = ["EMBEDDING"]


def _bind_embedding(args: tuple, kwargs: dict[str, Any]) -> Call | str:
    """``F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, ...)``."""
    ids = argument(args, kwargs, 0, "input", None)
    weight = argument(args, kwargs, 1, "weight", None)
    padding_idx = argument(args, kwargs, 2, "padding_idx", None)
    if argument(args, kwargs, 5, "scale_grad_by_freq", False):
        return "F.embedding with scale_grad_by_freq scales gradients by counts in the batch"
    if ids.ndim < 1:
        return "F.embedding of a single id"
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return Call(ids, {"weight": weight}, {"padding_idx": padding_idx, "last_axis": ids.ndim - 1})


def _compute_embedding(
    call: Call, grad_output: Tensor, layout: Layout, references: Mapping[str, Tensor]
) -> Results:
    """Per-example dots and norms of an embedding table."""
    if "weight" not in references:
        return {}
    batch = call.input.shape[layout.axis] // layout.rows
    ids = to_examples(call.input, layout, batch).reshape(batch, -1)
    b = to_examples(grad_output, layout, batch).reshape(batch, ids.shape[1], -1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if call.options["padding_idx"] is not None:
        keep = ids != call.options["padding_idx"]
    b = b * keep.unsqueeze(-1).to(b.dtype)
    refs = references["weight"]
    dots = torch.stack([(F.embedding(ids, r) * b).sum(dim=(1, 2)) for r in refs], dim=1)
    vocab = refs.shape[1]
    example = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
    pairs, which = torch.unique((example * vocab + ids).reshape(-1), return_inverse=True)
    sums = b.new_zeros(pairs.shape[0], b.shape[-1]).index_add_(0, which, b.reshape(-1, b.shape[-1]))
    sq = b.new_zeros(batch).index_add_(0, pairs // vocab, sums.square().sum(dim=1))
    return {"weight": (dots, sq)}


def _parts_embedding(call: Call, grad_output: Tensor, layout: Layout) -> dict[str, Any]:
    """``G = sum_t onehot(id_t) b_t^T``, padding rows masked out."""
    batch = call.input.shape[layout.axis] // layout.rows
    ids = to_examples(call.input, layout, batch).reshape(batch, -1)
    b = to_examples(grad_output, layout, batch).reshape(batch, ids.shape[1], -1)
    if call.options["padding_idx"] is not None:
        b = b * (ids != call.options["padding_idx"]).unsqueeze(-1).to(b.dtype)
    return {"weight": Outer(None, ids, b)}


EMBEDDING = Form(
    "F.embedding",
    (F.embedding,),
    _bind_embedding,
    _compute_embedding,
    _parts_embedding,
    {"weight": "outer"},
)
