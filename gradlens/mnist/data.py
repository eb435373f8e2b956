"""MNIST as tensors, from a data root resolved explicitly.

The root is, in order: the ``root`` argument, the ``GRADLENS_DATA_DIR``
environment variable, or ``~/.cache/gradlens`` (``$XDG_CACHE_HOME/gradlens``),
where torchvision may download the files when ``download=True``. Under the
root, torchvision expects ``MNIST/raw/`` with the four standard files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from gradlens.errors import DataNotFoundError

__all__ = ["DATA_DIR_ENV", "Digits", "candidate_roots", "load_mnist"]

DATA_DIR_ENV = "GRADLENS_DATA_DIR"


class Digits(NamedTuple):
    """A labelled image set held in memory.

    Attributes:
        images: Flattened pixels scaled to ``[-1, 1]``, shape ``(example, pixel)``.
        labels: Class indices, shape ``(example,)``.
    """

    images: Tensor
    labels: Tensor


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradlens"


def candidate_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Return the data roots to try, most explicit first.

    An explicit ``root`` is the only candidate; otherwise the environment
    variable (if set), then the user cache directory.
    """
    if root is not None:
        return [Path(root).expanduser()]
    env = os.environ.get(DATA_DIR_ENV)
    return [Path(env).expanduser(), _cache_dir()] if env else [_cache_dir()]


def load_mnist(
    root: str | os.PathLike | None = None, *, train: bool = True, download: bool = False
) -> Digits:
    """Load MNIST through ``torchvision.datasets.MNIST`` as in-memory tensors.

    Args:
        root: Data root holding ``MNIST/raw``; see the module docstring for the fallbacks.
        train: The 60,000 training images, else the 10,000 test images.
        download: Let torchvision download into the last candidate root if
            the files are nowhere (needs internet).

    Returns:
        :class:`Digits` with float32 images in ``[-1, 1]``, shape ``(example, 784)``.

    Raises:
        DataNotFoundError: Naming every path tried and how to fix it.
    """
    from torchvision.datasets import MNIST

    roots = candidate_roots(root)
    for candidate in roots:
        try:
            dataset = MNIST(str(candidate), train=train, download=False)
            break
        except RuntimeError:
            continue
    else:
        if not download:
            tried = "\n".join(f"  - {r / 'MNIST' / 'raw'}" for r in roots)
            raise DataNotFoundError(
                f"MNIST ({'train' if train else 'test'}) was not found. Looked in:\n{tried}\n"
                f"Fix: pass the folder that contains MNIST/raw (data_dir=... or --data-dir), "
                f"set {DATA_DIR_ENV} to it, or pass download=True where there is internet."
            )
        dataset = MNIST(str(roots[-1]), train=train, download=True)
    images = dataset.data.reshape(len(dataset.data), -1).to(torch.float32)
    return Digits(images=images / 127.5 - 1.0, labels=dataset.targets.clone())
