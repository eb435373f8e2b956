"""MNIST as tensors, from a data root resolved explicitly, validated on load.

The root is, in order: the ``root`` argument, the ``GRADLENS_DATA_DIR``
environment variable, or ``~/.cache/gradlens`` (``$XDG_CACHE_HOME/gradlens``),
where torchvision may download the files when ``download=True``. Under the
root, ``MNIST/raw/`` holds the standard IDX files (torchvision's layout):
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` and the ``t10k-``
pair of the test split.

The files are read here and checked before use: the IDX magic number, the
header, a file length that matches the header (a truncated file is damaged,
not missing), 28x28 images, labels in 0..9, as many labels as images, and
the split's size (60,000 train, 10,000 test; a swapped pair is named as
such). A failed check raises :class:`~gradlens.errors.DamagedDataError`
naming the file and the problem. A file that passes them but whose bytes
differ from the published MNIST file of its name (:data:`PUBLISHED_SHA256`:
random bytes over its pixels, say) is used as it is, with a
:class:`ModifiedDataWarning` naming it, so that changed data is never used
unnoticed and deliberately modified data stays usable.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradlens.errors import DamagedDataError, DataNotFoundError

__all__ = [
    "DATA_DIR_ENV",
    "PROTOCOLS",
    "PUBLISHED_SHA256",
    "RERUN_HELD_OUT",
    "RERUN_SPLIT_SEED",
    "SPLIT_SIZES",
    "Digits",
    "ModifiedDataWarning",
    "candidate_roots",
    "load_mnist",
    "protocol_train",
    "read_idx",
    "train_size",
]

DATA_DIR_ENV = "GRADLENS_DATA_DIR"

SPLIT_SIZES: dict[str, int] = {"train": 60_000, "test": 10_000}
"""Examples in each MNIST split."""

PROTOCOLS: tuple[str, ...] = ("original", "rerun")
"""The data protocols: Cloud et al.'s (every training image) and the public rerun's."""

RERUN_SPLIT_SEED = 1234
"""The public rerun's ``SPLIT_SEED`` (barathvelmu/subliminal-learning ``mnist/experiment.py``)."""

RERUN_HELD_OUT = 10_000
"""The public rerun's ``VAL_SIZE``: training images held out of the teachers' data."""

PUBLISHED_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""SHA-256 of the four published MNIST files, unpacked (the files ``load_mnist`` reads).

Computed from the copies whose MD5 sums equal the published ones (torchvision's list);
``*.gz`` files beside them are never read.
"""

_PREFIX = {"train": "train", "test": "t10k"}
_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 or 1 dims
_SIDE = 28


class ModifiedDataWarning(UserWarning):
    """An MNIST file that differs from the published one; it is used as it is."""


class Digits(NamedTuple):
    """A labelled image set held in memory.

    Attributes:
        images: Flattened pixels scaled to ``[-1, 1]``, shape ``(example, pixel)``.
        labels: Class indices, shape ``(example,)``.
    """

    images: Tensor
    labels: Tensor


def _check_protocol(protocol: str | None) -> str:
    protocol = protocol or "original"
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {list(PROTOCOLS)}, got {protocol!r}.")
    return protocol


def train_size(protocol: str | None = None) -> int:
    """The training images the teachers learn from (and the probes come from).

    Raises:
        ValueError: For an unknown protocol.
    """
    held_out = RERUN_HELD_OUT if _check_protocol(protocol) == "rerun" else 0
    return SPLIT_SIZES["train"] - held_out


def protocol_train(train: Digits, protocol: str | None = None) -> Digits:
    """The part of MNIST's training split that a protocol's teachers learn from.

    ``"original"`` (or ``None``): all of it (Cloud et al.'s). ``"rerun"``: the public
    rerun's split, ``perm = torch.randperm(60000, generator=manual_seed(1234))``,
    ``perm[10000:]`` kept in that order (its ``load_splits``): 50,000 images; its
    ``perm[:10000]`` (a validation set there) is used by nothing here.

    Args:
        train: MNIST's whole training split, 60,000 images in file order.
        protocol: ``"original"``, ``"rerun"`` or ``None`` (the original's).

    Raises:
        ValueError: For an unknown protocol, or a ``train`` that is not the whole split.
    """
    if _check_protocol(protocol) == "original":
        return train
    if len(train.labels) != SPLIT_SIZES["train"]:
        raise ValueError(
            f"the rerun's split is of MNIST's whole training split ({SPLIT_SIZES['train']:,} "
            f"images), got {len(train.labels):,}; pass load_mnist(train=True) unchanged."
        )
    gen = torch.Generator().manual_seed(RERUN_SPLIT_SEED)
    perm = torch.randperm(SPLIT_SIZES["train"], generator=gen)
    keep = perm[RERUN_HELD_OUT:].to(train.labels.device)
    return Digits(train.images[keep], train.labels[keep])


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


def split_files(raw: Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of a split (``"train"`` or ``"test"``) in a raw folder."""
    prefix = _PREFIX[split]
    return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"


def _damaged(path: Path, problem: str) -> DamagedDataError:
    return DamagedDataError(
        f"MNIST file {path} is damaged: {problem}. Replace it with a fresh copy (the MNIST "
        "raw files, unpacked), or delete it and load with download=True where there is "
        "internet.",
        filename=str(path),
    )


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Read and check one MNIST IDX file of unsigned bytes.

    Args:
        path: The file.
        kind: ``"images"`` (3 dims: example, row, column of 28x28) or
            ``"labels"`` (1 dim, values 0..9).

    Returns:
        uint8 array, shape ``(example, 28, 28)`` or ``(example,)``.

    Raises:
        DamagedDataError: Naming the file and what is wrong with it.
    """
    data = np.fromfile(path, dtype=np.uint8)
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if data.size >= 2 and data[0] == 0x1F and data[1] == 0x8B:
        raise _damaged(path, "it is gzip-compressed; unpack it (gunzip) under the same name")
    short = _damaged(
        path, f"it has {data.size} bytes, fewer than the {header}-byte header of IDX {kind}"
    )
    if data.size < 4:
        raise short
    magic = int.from_bytes(data[:4].tobytes(), "big")
    if magic != _MAGIC[kind]:
        other = "labels" if kind == "images" else "images"
        why = (
            f"it is an IDX {other} file, where {kind} belong (are the file names swapped?)"
            if magic == _MAGIC[other]
            else f"its magic number is {magic:#010x}, not {_MAGIC[kind]:#010x} of IDX {kind} "
            "(not an MNIST file, or a corrupt one)"
        )
        raise _damaged(path, why)
    if data.size < header:
        raise short
    dims = [int.from_bytes(data[i : i + 4].tobytes(), "big") for i in range(4, header, 4)]
    if kind == "images" and dims[1:] != [_SIDE, _SIDE]:
        raise _damaged(path, f"its images are {dims[1]}x{dims[2]} pixels, not 28x28")
    expected = header + int(np.prod(dims))
    if data.size != expected:
        how = "truncated" if data.size < expected else "longer than its header says"
        raise _damaged(
            path,
            f"{how}: its header says {dims[0]} {kind}, {expected} bytes, but it has "
            f"{data.size} bytes",
        )
    array = data[header:].reshape(dims)
    if kind == "labels" and array.size and int(array.max()) > 9:
        bad = int(np.argmax(array > 9))
        raise _damaged(path, f"label {int(array[bad])} at example {bad} is not a digit 0..9")
    return array


def _check_published(path: Path) -> None:
    """Warn, naming ``path``, if its bytes are not the published MNIST file of its name."""
    published = PUBLISHED_SHA256.get(path.name)
    if published is None:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != published:
        warnings.warn(
            f"MNIST file {path} differs from the published MNIST {path.name} (SHA-256 "
            f"{digest[:16]}..., published {published[:16]}...): some of its pixels or labels "
            "were changed. It is used as it is; if you did not change it on purpose, replace "
            "it with a fresh copy.",
            ModifiedDataWarning,
            stacklevel=4,
        )


def _read_split(raw: Path, split: str) -> Digits:
    """Read and cross-check a split's two files."""
    image_path, label_path = split_files(raw, split)
    images, labels = read_idx(image_path, "images"), read_idx(label_path, "labels")
    other = "test" if split == "train" else "train"
    sizes = {len(images): image_path, len(labels): label_path}
    if len(images) != len(labels):
        hint = (
            f"; {SPLIT_SIZES[other]:,} is the size of the {other} split, so one of the "
            "files was swapped with its other-split twin"
            if SPLIT_SIZES[other] in sizes
            else ""
        )
        raise DamagedDataError(
            f"MNIST {split} files disagree: {image_path} has {len(images):,} images but "
            f"{label_path} has {len(labels):,} labels{hint}. Replace the wrong file.",
            filename=str(image_path if len(images) != SPLIT_SIZES[split] else label_path),
        )
    if len(images) != SPLIT_SIZES[split]:
        why = (
            f"the size of MNIST's {other} split: are the train-* and t10k-* files swapped?"
            if len(images) == SPLIT_SIZES[other]
            else "a different or partial dataset"
        )
        raise DamagedDataError(
            f"MNIST's {split} split has {SPLIT_SIZES[split]:,} examples, but {image_path} and "
            f"{label_path} hold {len(images):,}, {why} Replace them with the {split} files.",
            filename=str(image_path),
        )
    for path in (image_path, label_path):  # whole and consistent: now, is it MNIST's?
        _check_published(path)
    pixels = torch.from_numpy(images.reshape(len(images), -1)).to(torch.float32)
    return Digits(images=pixels / 127.5 - 1.0, labels=torch.from_numpy(labels).to(torch.int64))


def load_mnist(
    root: str | os.PathLike | None = None, *, train: bool = True, download: bool = False
) -> Digits:
    """Load an MNIST split from its raw IDX files as in-memory tensors, checking them.

    Args:
        root: Data root holding ``MNIST/raw``; see the module docstring for the fallbacks.
        train: The 60,000 training images, else the 10,000 test images.
        download: Let torchvision download into the last candidate root if
            the files are nowhere (needs internet).

    Returns:
        :class:`Digits` with float32 images in ``[-1, 1]``, shape ``(example, 784)``.

    Raises:
        DataNotFoundError: Naming every path tried and how to fix it.
        DamagedDataError: For a file that is there but damaged (truncated,
            a bad header, labels outside 0..9, counts that disagree, the
            other split's file), naming the file and the problem.
    """
    split = "train" if train else "test"
    roots = candidate_roots(root)
    missing: list[str] = []
    for candidate in roots:
        raw = candidate / "MNIST" / "raw"
        present = [path.is_file() for path in split_files(raw, split)]
        if all(present):
            return _read_split(raw, split)
        if any(present):
            gone = [p.name for p, there in zip(split_files(raw, split), present, strict=True)]
            missing.append(
                f"  - {raw} (has one file of the pair, lacks {gone[present.index(False)]})"
            )
        else:
            missing.append(f"  - {raw}")
    if not download:
        tried = "\n".join(missing)
        raise DataNotFoundError(
            f"MNIST ({split}) was not found. Looked in:\n{tried}\n"
            f"Fix: pass the folder that contains MNIST/raw (data_dir=... or --data-dir), "
            f"set {DATA_DIR_ENV} to it, or pass download=True where there is internet."
        )
    from torchvision.datasets import MNIST

    MNIST(str(roots[-1]), train=train, download=True)
    return _read_split(roots[-1] / "MNIST" / "raw", split)
