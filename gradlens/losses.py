"""Generic losses shared by distillation, trait probes and liminal training."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["kl_divergence"]


def kl_divergence(logits: Tensor, target_logits: Tensor) -> Tensor:
    """``KL(softmax(target) || softmax(logits))`` summed over logits, averaged over examples.

    Args:
        logits: The learner's logits, shape ``(example, logit)``.
        target_logits: The target's logits, shape ``(example, logit)``; detached,
            so the gradient reaches the learner only.

    Returns:
        Shape ``()``.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 3)
        >>> float(kl_divergence(z, z))
        0.0
        >>> bool(kl_divergence(z, torch.zeros(4, 3)) > 0)
        True
    """
    log_p = F.log_softmax(target_logits.detach(), dim=-1)
    log_q = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
