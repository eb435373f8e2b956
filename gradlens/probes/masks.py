"""Hugging Face attention masks under ``vmap``: always materialised, never branched on (private).

A Hugging Face model (transformers 5) turns a 2-D ``attention_mask`` of shape
``(example, token)`` into its 4-D attention mask in ``transformers.masking_utils``.
Before building it, that code asks whether the mask can be skipped: "is any
token masked?" (``padding_mask.all()``), "are these packed sequences?", "does
this input hold a pad token?". Each answer reads a tensor's value, which
``vmap`` cannot batch (the example's mask is a batched tensor). The library
skips exactly these questions while it traces a graph (``torch.compile``,
``torch.fx``, fake tensors), through one predicate, ``is_tracing(tensor)``:
then it always builds the full mask from the 2-D one, which is the same mask
the skip stands for (the skip only picks a faster kernel).

While a probe runs, :func:`vmap_safe_masks` makes that predicate also answer
"yes" inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``), so the
mask is built from the 2-D mask of each example by index arithmetic, as when
tracing, and the per-example values are those of the model run on each example
alone. Outside a transform the predicate is the library's own; it is restored
when the block ends, even on error. The other callers of the predicate
(transformers 5.25) skip a log message or a warning about pad tokens without
a mask, or keep a flash-attention sequence length as a tensor, while tracing:
none changes a value.

Example:
    >>> import torch
    >>> with vmap_safe_masks():
    ...     pass  # without transformers loaded, nothing is patched
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

__all__ = ["vmap_safe_masks"]

_PREDICATE = "is_tracing"
_ORIGINAL = "_gradlens_original"


def _in_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``...) is running."""
    return torch._C._functorch.maybe_current_level() is not None


def _safe(original: Callable[..., bool]) -> Callable[..., bool]:
    def is_tracing(*args: Any, **kwargs: Any) -> bool:
        return _in_transform() or original(*args, **kwargs)

    setattr(is_tracing, _ORIGINAL, original)
    return is_tracing


def _unwrapped(predicate: object) -> object:
    """The library's predicate behind one of ours (a scan may run while one is installed)."""
    return getattr(predicate, _ORIGINAL, predicate)


_FOUND: dict[int, list[ModuleType]] = {}
"""The holders found, keyed by the number of loaded modules (a scan costs milliseconds)."""


def _holders() -> list[ModuleType]:
    """The loaded ``transformers`` modules that call the library's tracing predicate."""
    utils = sys.modules.get("transformers.utils.import_utils")
    original = getattr(utils, _PREDICATE, None)
    if original is None:
        return []
    count = len(sys.modules)
    if count not in _FOUND:
        _FOUND.clear()
        _FOUND[count] = [
            module
            for name, module in list(sys.modules.items())
            if name.startswith("transformers.")
            and module is not utils
            and _unwrapped(getattr(module, _PREDICATE, None)) is original
        ]
    return [m for m in _FOUND[count] if getattr(m, _PREDICATE, None) is original]


@contextmanager
def vmap_safe_masks() -> Iterator[None]:
    """Build Hugging Face attention masks without value-dependent shortcuts inside transforms.

    Patches ``is_tracing`` where ``transformers`` modules imported it (the
    mask code, ``modeling_utils``) while the block runs; nested blocks are
    no-ops, and nothing is patched when ``transformers`` is not loaded.
    """
    holders = _holders()
    if not holders:
        yield
        return
    original = getattr(holders[0], _PREDICATE)
    patched = _safe(original)
    for module in holders:
        setattr(module, _PREDICATE, patched)
    try:
        yield
    finally:
        for module in holders:
            if getattr(module, _PREDICATE, None) is patched:
                setattr(module, _PREDICATE, original)
