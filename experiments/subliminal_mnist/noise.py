"""Uniform noise images in ``[-1, 1]``: the original's fixed set per model, or fresh ones.

Cloud et al.'s ``scripts/run_mnist_experiment.py`` draws, for each of its
models, one fixed set of 60,000 uniform images (``rand_like(train_x) * 2 - 1``)
and distils on it for 5 epochs, reshuffled every epoch per model. That is
``kind="fixed"`` here (the default of the experiment). ``kind="fresh"`` draws
new images for every batch (what gradlens did before), about 300,000 distinct
images over 5 epochs.

The fixed set is stored as 16-bit levels (``int16``, 65,536 equally spaced
values ``(k + 0.5) / 32768`` in ``(-1, 1)``) to halve its memory: 94 MB per
model instead of 188 MB; the original's float32 ``rand`` is itself a grid of
2^24 levels. Everything is reproducible from the models' seeds: the same
images and orders on every run and in every condition of a run.

Example:
    >>> bool(torch.equal(noise_batch(0, 1, 2, 4), noise_batch(0, 1, 2, 4)))
    True
    >>> stream = NoiseStream.create("fixed", seeds=[0, 1], size=10, batch_size=4, dim=3)
    >>> [tuple(b.shape) for b in stream.batches(epoch=0)]
    [(2, 4, 3), (2, 4, 3), (2, 2, 3)]
    >>> first = torch.cat(list(stream.batches(epoch=0)), dim=1).sort(dim=1).values
    >>> second = torch.cat(list(stream.batches(epoch=1)), dim=1).sort(dim=1).values
    >>> bool(torch.equal(first, second))  # the same images, in another order
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["NOISE_KINDS", "NoiseKind", "NoiseStream", "noise_batch"]

NoiseKind = Literal["fixed", "fresh"]
NOISE_KINDS: tuple[str, ...] = ("fixed", "fresh")
_LEVELS = 32768.0


def _generator(*keys: int) -> torch.Generator:
    # hash() of a tuple of ints is the same in every process (no string hashing).
    return torch.Generator().manual_seed(hash(keys) & 0x7FFF_FFFF_FFFF_FFFF)


def noise_batch(
    seed: int, epoch: int, index: int, batch_size: int, dim: int = 784, device: str = "cpu"
) -> Tensor:
    """Return one fresh batch of images uniform in ``[-1, 1]``.

    The batch depends only on its arguments, so the teacher's logits and the
    student's step see the same images, and a rerun sees them again.

    Args:
        seed: The model's (or experiment's) seed.
        epoch: Epoch number.
        index: Batch number within the epoch.
        batch_size: Images in the batch.
        dim: Pixels per image.
        device: Where to put the batch.

    Returns:
        Shape ``(example, pixel)``.
    """
    gen = torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    return (torch.rand(batch_size, dim, generator=gen) * 2 - 1).to(device)


@dataclass(frozen=True)
class NoiseStream:
    """The noise batches of a block of models, one batch per model per step.

    Build it with :meth:`create`.

    Attributes:
        kind: ``"fixed"`` (one set per model, reshuffled per epoch) or ``"fresh"``.
        seeds: One seed per model.
        size: Images per epoch (per model).
        batch_size: Images per step (the last batch of an epoch may be smaller).
        dim: Pixels per image.
        levels: The fixed sets as 16-bit levels, ``(model, example, pixel)``;
            ``None`` for fresh noise.
        device: Where the batches go.
    """

    kind: NoiseKind
    seeds: tuple[int, ...]
    size: int
    batch_size: int
    dim: int
    levels: Tensor | None
    device: str

    @classmethod
    def create(
        cls,
        kind: NoiseKind,
        *,
        seeds: Sequence[int],
        size: int,
        batch_size: int,
        dim: int = 784,
        device: str | torch.device = "cpu",
    ) -> NoiseStream:
        """Draw the fixed sets (for ``kind="fixed"``) and return the stream.

        Raises:
            ValueError: An unknown ``kind`` or non-positive sizes.
        """
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}.")
        if size < 1 or batch_size < 1 or dim < 1 or not seeds:
            raise ValueError(
                f"noise needs size, batch_size and dim >= 1 and at least one seed; got "
                f"size={size}, batch_size={batch_size}, dim={dim}, seeds={list(seeds)}."
            )
        levels = None
        if kind == "fixed":
            levels = torch.stack(
                [
                    torch.randint(
                        -32768, 32768, (size, dim), generator=_generator(s, 1), dtype=torch.int16
                    )
                    for s in seeds
                ]
            ).to(device)
        return cls(kind, tuple(seeds), size, batch_size, dim, levels, str(device))

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch."""
        return -(-self.size // self.batch_size)

    def batches(self, epoch: int) -> Iterator[Tensor]:
        """The epoch's batches, each ``(model, example, pixel)`` float32."""
        if self.levels is None:
            for index in range(self.steps_per_epoch):
                size = min(self.batch_size, self.size - index * self.batch_size)
                yield torch.stack(
                    [noise_batch(s, epoch, index, size, self.dim, self.device) for s in self.seeds]
                )
            return
        order = torch.stack(
            [torch.randperm(self.size, generator=_generator(s, 2, epoch)) for s in self.seeds]
        ).to(self.levels.device)
        for start in range(0, self.size, self.batch_size):
            idx = order[:, start : start + self.batch_size]
            picked = torch.gather(
                self.levels, 1, idx[:, :, None].expand(-1, -1, self.dim)
            )  # (model, example, pixel)
            yield (picked.to(torch.float32) + 0.5) / _LEVELS
