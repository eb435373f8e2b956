"""Distillation and trait losses on a slice of the logits.

All losses are mean-reduced over the examples of a batch ("batchmean" over
examples only: the original code's ``batchmean`` over a ``(model, example,
logit)`` tensor also divides by the number of models, which we do not copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradlens.probes.vmap import LossFn
from gradlens.training.losses import kl_divergence

__all__ = [
    "class_cross_entropy",
    "example_cross_entropy",
    "example_kl",
    "logit_kl",
]


def logit_kl(start: int, stop: int | None = None) -> LossFn:
    """Distillation loss on logits ``[start:stop]``: ``loss(outputs, target_logits)``.

    ``target_logits`` holds the teacher's logits on that same slice.

    Args:
        start: First logit distilled (10 for the auxiliary logits after 10 classes).
        stop: One past the last; ``None`` for the end.
    """

    def loss(outputs: Tensor, target_logits: Tensor) -> Tensor:
        return kl_divergence(outputs[..., start:stop], target_logits)

    return loss


def class_cross_entropy(num_classes: int = 10) -> LossFn:
    """Trait loss: cross-entropy of the first ``num_classes`` logits against labels."""

    def loss(outputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(outputs[..., :num_classes], labels)

    return loss


def example_kl(logits: Tensor, target_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-example ``KL(softmax(target / T) || softmax(logits / T))``, summed over logits.

    Any leading dims (``model``, ``example``) are kept; the target is detached.
    ``T = 1`` gives the per-example terms of :func:`gradlens.training.losses.kl_divergence`.

    Args:
        logits: ``(..., logit)``.
        target_logits: Same shape.
        temperature: ``T``.

    Returns:
        ``(...)``, the logit dim summed out.
    """
    log_q = F.log_softmax(logits / temperature, dim=-1)
    log_p = F.log_softmax(target_logits.detach().to(logits.dtype) / temperature, dim=-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)


def example_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy of ``(model, example, class)`` logits, ``(model, example)``.

    ``labels`` is ``(example,)`` (shared by the models) or ``(model, example)``.
    """
    log_q = F.log_softmax(logits, dim=-1)
    labels = labels.expand(logits.shape[:-1])
    return -log_q.gather(-1, labels[..., None]).squeeze(-1)
