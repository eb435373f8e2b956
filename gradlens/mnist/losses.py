"""Distillation and trait losses on a slice of the logits.

All losses are mean-reduced over the examples of a batch ("batchmean" over
examples only: the original code's ``batchmean`` over a ``(model, example,
logit)`` tensor also divides by the number of models, which we do not copy).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from gradlens.losses import kl_divergence
from gradlens.per_example import LossFn

__all__ = ["class_cross_entropy", "class_kl", "logit_kl"]


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


def class_kl(num_classes: int = 10) -> LossFn:
    """Trait loss: KL from the teacher's class distribution, ``loss(outputs, teacher_logits)``."""
    return logit_kl(0, num_classes)
