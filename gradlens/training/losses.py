"""Generic losses shared by distillation, trait probes and liminal training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kl_divergence", "token_losses", "token_mean", "token_weights"]


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


def token_mean(
    logits: Tensor, labels: Tensor, weights: Tensor | None = None, *, shift: bool = True
) -> Tensor:
    """Each example's mean cross-entropy over its own valid tokens, weighted, then the mean.

    ``mean_i(w_i * l_i)``, with ``l_i`` example ``i``'s mean over its valid
    tokens. Without ``weights`` every example weighs the same, whatever its
    length (*per-example token means*). With :func:`token_weights`
    (``w_i = n_i / mean_j n_j`` for ``n_i`` valid tokens) it is the *batch
    token mean*, ``sum_{i,t} l_{i,t} / sum_i n_i``: Hugging Face models' own
    loss. Either way the loss on the batch is the mean of its value on each
    example alone (the weights are targets, so each example carries its own),
    which is what a probed step follows exactly.

    Args:
        logits: ``(example, token, vocab)``.
        labels: ``(example, token)``, -100 where ignored (padding, prompts).
        weights: ``(example,)``, each example's weight; ``None`` for ones.
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
        >>> token_weights(labels, shift=False)  # 3 and 1 valid tokens, 2 on average
        tensor([1.5000, 0.5000], dtype=torch.float64)
    """
    return token_losses(logits, labels, weights, shift=shift).sum(dim=1).mean()


def token_losses(
    logits: Tensor, labels: Tensor, weights: Tensor | None = None, *, shift: bool = True
) -> Tensor:
    """The per-token terms of :func:`token_mean`: ``w_i * l_{i,t} / n_i`` at each valid token.

    ``token_mean(logits, labels, weights)`` is ``token_losses(...).sum(1).mean()``,
    so an example's loss is the sum of its row: the per-token loss that
    :func:`~gradlens.probes.token_dots` differentiates.

    Args:
        logits: ``(example, token, vocab)``.
        labels: ``(example, token)``, -100 where ignored.
        weights: ``(example,)``, or ``None`` for ones (:func:`token_weights`).
        shift: As in :func:`token_mean`; each term then sits at the position of
            the token it predicts (position 0, predicted by nothing, holds 0),
            so the row lines up with the input ids.

    Returns:
        ``(example, token)``, 0 where the label is ignored.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[5, 1, 2, -100]])
        >>> token_losses(torch.zeros(1, 4, 6), labels).squeeze(0)  # log(6) / 2 at 1 and 2
        tensor([0.0000, 0.8959, 0.8959, 0.0000])
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    each = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    scale = 1 / mask.sum(dim=1, keepdim=True).clamp_min(1).to(each.dtype)
    if weights is not None:
        scale = scale * weights.to(each.dtype)[:, None]
    terms = each * mask * scale
    return F.pad(terms, (1, 0)) if shift else terms


def token_weights(labels: Tensor, *, shift: bool = True) -> Tensor:
    """Each example's weight in the batch token mean: its valid tokens over the batch's mean.

    ``w_i = n_i / mean_j n_j`` (0 for an example without valid tokens, all 0 for
    a batch without any), so that ``token_mean(logits, labels, w)`` is the mean
    over every valid token of the batch and ``mean_i w_i = 1``. Computed from
    the whole batch once, then carried by each example as a target.

    Args:
        labels: ``(example, token)``, -100 where ignored.
        shift: As in :func:`token_mean` (the first label predicts nothing).

    Returns:
        ``(example,)``, float64 (float32 on MPS, which has no float64);
        :func:`token_mean` casts it to the loss's dtype.
    """
    if shift:
        labels = labels[:, 1:]
    dtype = torch.float32 if labels.device.type == "mps" else torch.float64
    count = (labels != -100).sum(dim=1).to(dtype)
    return count * count.numel() / count.sum().clamp_min(1)
