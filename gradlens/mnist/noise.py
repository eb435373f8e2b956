"""Uniform noise images, reproducible from (seed, epoch, batch index)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["noise_batch"]


def noise_batch(
    seed: int, epoch: int, index: int, batch_size: int, dim: int = 784, device: str = "cpu"
) -> Tensor:
    """Return one batch of images uniform in ``[-1, 1]``.

    The batch depends only on its arguments, so the teacher's logits and the
    student's step see the same images, and a rerun sees them again.

    Args:
        seed: Experiment seed.
        epoch: Epoch number.
        index: Batch number within the epoch.
        batch_size: Images in the batch.
        dim: Pixels per image.
        device: Where to put the batch.

    Returns:
        Shape ``(example, pixel)``.

    Example:
        >>> bool(torch.equal(noise_batch(0, 1, 2, 4), noise_batch(0, 1, 2, 4)))
        True
    """
    gen = torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    return (torch.rand(batch_size, dim, generator=gen) * 2 - 1).to(device)
