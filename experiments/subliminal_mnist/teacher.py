"""Plain supervised training and test accuracy on the class logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from subliminal_mnist.data import Digits

__all__ = ["accuracy", "train_classifier"]


@torch.no_grad()
def accuracy(model: nn.Module, digits: Digits, num_classes: int = 10, batch: int = 8192) -> float:
    """Fraction of ``digits`` whose argmax over the first ``num_classes`` logits is right."""
    correct = 0
    for start in range(0, len(digits.labels), batch):
        logits = model(digits.images[start : start + batch])[..., :num_classes]
        correct += int((logits.argmax(-1) == digits.labels[start : start + batch]).sum())
    return correct / len(digits.labels)


def train_classifier(
    model: nn.Module,
    digits: Digits,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    num_classes: int = 10,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place with Adam on cross-entropy of its class logits.

    Args:
        model: The model, on the same device as ``digits``.
        digits: Training images and labels.
        epochs: Passes over the data.
        batch_size: Examples per step.
        lr: Adam learning rate.
        seed: Seed of the shuffling.
        num_classes: The first logits that are class logits.
        progress: Show a progress bar.

    Returns:
        The same model, trained.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(digits.labels)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc="teacher", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(digits.labels.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                logits = model(digits.images[idx])[..., :num_classes]
                loss = F.cross_entropy(logits, digits.labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
    return model
