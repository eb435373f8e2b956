"""Teachers of a stack trained at once, and the test metrics of every model of a stack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from subliminal_mnist.data import Digits
from subliminal_mnist.losses import example_cross_entropy
from subliminal_mnist.stacked import stack_forward

__all__ = ["EVAL_METRICS", "evaluate_stack", "train_teacher_stack"]

EVAL_METRICS: dict[str, tuple[str, str]] = {
    "test_accuracy": ("test accuracy (argmax of the class logits)", "1"),
    "test_loss": ("cross-entropy of the class logits on the test digits", "nat"),
    "test_entropy": ("mean entropy of the class distribution on the test digits", "nat"),
    "test_majority": ("fraction of test digits given the most-predicted class", "1"),
}
"""What :func:`evaluate_stack` returns: ``name -> (long name, units)``.

A student collapsed onto one class reads accuracy near 10%, like chance, but
``test_majority`` near 1, entropy near 0 and a large ``test_loss``.
"""


@torch.no_grad()
def evaluate_stack(
    stack: Mapping[str, Tensor], digits: Digits, num_classes: int = 10, chunk: int = 2048
) -> dict[str, Tensor]:
    """Every model's :data:`EVAL_METRICS` on ``digits``, each ``(model,)``."""
    correct, loss, entropy, counts = 0, 0, 0, 0
    for start in range(0, len(digits.labels), chunk):
        images = digits.images[start : start + chunk].to(next(iter(stack.values())).dtype)
        labels = digits.labels[start : start + chunk]
        logits = stack_forward(stack, images)[..., :num_classes]
        predicted = logits.argmax(-1)
        correct = correct + (predicted == labels).sum(-1)
        loss = loss + example_cross_entropy(logits, labels).sum(-1)
        log_p = torch.log_softmax(logits, -1)
        entropy = entropy - (log_p.exp() * log_p).sum(-1).sum(-1)
        counts = counts + torch.nn.functional.one_hot(predicted, num_classes).sum(1)
    n = len(digits.labels)
    return {
        "test_accuracy": correct.to(torch.float64) / n,
        "test_loss": loss / n,
        "test_entropy": entropy / n,
        "test_majority": counts.max(-1).values.to(torch.float64) / n,
    }


def train_teacher_stack(
    stack: Mapping[str, Tensor],
    digits: Digits,
    *,
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    lr: float,
    num_classes: int = 10,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Train every model of ``stack`` with Adam on the cross-entropy of its class logits.

    Model ``m`` sees the training images in the order
    :func:`subliminal_mnist.train_classifier` uses with ``seed=seeds[m]``, so it
    ends as that function would leave it (up to float summation order).

    Returns:
        The trained stack (new tensors, without ``requires_grad``).
    """
    params = {n: v.detach().clone().requires_grad_(True) for n, v in stack.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(digits.labels)
    steps = epochs * -(-n // batch_size)
    with tqdm(total=steps, desc="teachers", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.stack([torch.randperm(n, generator=g) for g in gens])
            order = order.to(digits.labels.device)
            for start in range(0, n, batch_size):
                idx = order[:, start : start + batch_size]
                images = digits.images[idx].to(optimizer.param_groups[0]["params"][0].dtype)
                logits = stack_forward(params, images)[..., :num_classes]
                loss = example_cross_entropy(logits, digits.labels[idx]).mean(-1).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
    return {n: p.detach() for n, p in params.items()}
