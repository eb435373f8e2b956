"""The values of a step's records of its gradients and of its update (private).

:func:`gradient_records` (``g`` against ``g_t``, and each example's cosine) and
:func:`update_records` (the update against ``g_t``) are pure tensor functions of
one model's tensors, taken over the mode's models by ``over_models``; the step
body (:mod:`gradlens.training.body`) calls them, and ``probed_step(compile=...)``
runs them through ``torch.compile`` (:mod:`gradlens.compiling`, part ``"records"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradlens.alignment.gradops import safe_divide
from gradlens.alignment.layerstats import layer_stats
from gradlens.alignment.measures import summarize
from gradlens.compiling import compiled
from gradlens.training.mode import StepMode

__all__ = ["Pair", "gradient_records", "pair", "update_records"]

Grads = Mapping[str, Tensor]


def _sum_params(values: Mapping[str, Tensor]) -> Tensor:
    return torch.stack(list(values.values())).sum(dim=0)


def _stats(grad: Grads, reference: Grads) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer ``<g, r>``, ``||g||^2`` and ``||r||^2`` of one model, each ``(layer,)``."""
    s = layer_stats(grad, reference=reference)
    return s.dot, s.sq_norm, s.ref_sq_norm


class Pair(NamedTuple):
    """Per-layer statistics of a gradient against a reference, with the mode's lead dims."""

    dot: Tensor
    sq: Tensor
    ref_sq: Tensor

    @property
    def cosine(self) -> Tensor:
        """``cos`` over all layers, with the mode's lead dims; 0 where either is zero."""
        return safe_divide(self.dot.sum(-1), (self.sq.sum(-1) * self.ref_sq.sum(-1)).sqrt())


def pair(mode: StepMode, grad: Grads, reference: Grads) -> Pair:
    """Per-layer statistics of ``grad`` against ``reference`` over the mode's models."""
    return Pair(*mode.over_models(_stats)(grad, reference))


@compiled("records")
def gradient_records(
    over_models: Callable[[Callable[..., Any]], Callable[..., Any]],
    g: Grads,
    g_t: Grads,
    applied: Grads | None,
    dots: Grads,
    sq_norms: Grads,
) -> tuple[dict[str, Tensor], Tensor]:
    """The records of ``g`` against ``g_t``, and each example's cosine with ``g_t``.

    Args:
        over_models: The mode's :meth:`~gradlens.training.mode.StepMode.over_models`.
        g: The training gradient.
        g_t: The trait gradient.
        applied: ``g`` after the ``before`` transform, or ``None`` without one.
        dots: ``<g_i[p], g_t[p]>``, name -> ``(*model, example)``; empty without
            per-example values.
        sq_norms: ``||g_i[p]||^2``, name -> ``(*model, example)``; empty likewise.

    Returns:
        ``(records, example_cosine (*model, example))``; the records of
        :data:`~gradlens.training.records.STEP_RECORDS` that these give.
    """
    train_pair = Pair(*over_models(_stats)(g, g_t))
    trait_norm = train_pair.ref_sq.sum(-1).sqrt()
    g_dot_t = train_pair.dot.sum(-1)
    applied_cosine = (
        train_pair.cosine if applied is None else Pair(*over_models(_stats)(applied, g_t)).cosine
    )
    records = {
        "cosine": train_pair.cosine,
        "trait_norm": trait_norm,
        "train_norm": train_pair.sq.sum(-1).sqrt(),
        "projection": safe_divide(g_dot_t, trait_norm.square()),
        "layer_cosine": safe_divide(train_pair.dot, (train_pair.sq * train_pair.ref_sq).sqrt()),
        "layer_trait_norm": train_pair.ref_sq.sqrt(),
        "layer_train_norm": train_pair.sq.sqrt(),
        "applied_cosine": applied_cosine,
    }
    example_cosine = trait_norm.new_empty((*trait_norm.shape, 0))
    if sq_norms:
        example_cosine = safe_divide(
            _sum_params(dots), _sum_params(sq_norms).sqrt() * trait_norm[..., None]
        )
        summary = summarize(example_cosine)
        records["example_cosine_mean"] = summary["mean"]
        records["example_cosine_quantile"] = summary["quantile"]
        records["example_cosine_frac_positive"] = summary["frac_positive"]
    return records, example_cosine


@compiled("records")
def update_records(
    over_models: Callable[[Callable[..., Any]], Callable[..., Any]], delta: Grads, g_t: Grads
) -> dict[str, Tensor]:
    """The update's records against ``g_t``: its cosine and the predicted trait-loss change."""
    pair = Pair(*over_models(_stats)(delta, g_t))
    return {
        "update_cosine": pair.cosine,
        "predicted_change": pair.dot.sum(-1),
        "layer_predicted_change": pair.dot,
    }
