"""Generic losses shared by distillation, trait probes and liminal training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kl_divergence", "token_mean"]


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
    log_q = F.log_softmax(logits, dim=-1)
    log_p = F.log_softmax(target_logits.detach().to(logits.dtype), dim=-1)
    # An explicit sum rather than F.kl_div, which has no vmap batching rule
    # (per-example probes call losses under vmap). Classes the target rules
    # out (logit -inf, p = 0) add 0, as 0 log 0 = 0.
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1).mean()


def token_mean(logits: Tensor, labels: Tensor, *, shift: bool = True) -> Tensor:
    """Each example's mean cross-entropy over its own valid tokens, then the mean over examples.

    The language-model loss in the form a probed step follows exactly: every
    example weighs the same, whatever its length. (The usual batch token mean,
    Hugging Face's own loss, weighs each example by its number of valid tokens;
    a probed step refuses it unless every example has as many.)

    Args:
        logits: ``(example, token, vocab)``.
        labels: ``(example, token)``, -100 where ignored (padding, prompts).
        shift: Predict token ``t + 1`` from position ``t`` (a causal LM whose
            labels are its input ids, as Hugging Face's data collators give them).

    Returns:
        Shape ``()``.

    Example:
        >>> import torch
        >>> logits = torch.zeros(2, 4, 5)
        >>> labels = torch.tensor([[1, 2, 3, -100], [1, -100, -100, -100]])
        >>> round(float(token_mean(logits, labels, shift=False)), 4)  # log(5) per token
        1.6094
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    each = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    count = mask.sum(dim=1)
    return ((each * mask).sum(dim=1) / count.clamp_min(1)).mean()
