"""Counter-based random numbers from tensor ops only (private).

A random direction must be reproducible from the transform's state alone, the
same on every device, and drawable under ``torch.func.vmap`` (one key per
model). ``torch.Generator`` gives none of these, so the numbers here come from
a stateless hash of ``(key, count, index)``: Chris Wellons's ``lowbias32``
integer hash on int64 tensors holding 32-bit values, with the multiplications
split so that no intermediate passes ``2**49`` (int64 never overflows), then a
Box-Muller transform in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & MASK32


def hash32(x: Tensor) -> Tensor:
    """``lowbias32``: a bijective mix of 32-bit values held in an int64 tensor."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def fold_in(key: Tensor, data: Tensor | int) -> Tensor:
    """A new 32-bit key from ``key`` and ``data`` (both int64; any shapes that broadcast)."""
    data = torch.as_tensor(data, dtype=torch.int64, device=key.device)
    # Distinct constants on each side, so that equal inputs do not cancel (hash32(0) = 0).
    mixed = hash32(key ^ 0x9E3779B9) + hash32((key >> 32) ^ 0x7F4A7C15)
    return hash32(hash32(mixed) + hash32(data ^ 0x85EBCA6B))


def normal(key: Tensor, count: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """``n`` standard normal draws for ``(key, count)``, shape ``(n,)``, in ``dtype``.

    The same ``(key, count)`` give the same numbers on every device and under vmap.
    """
    stream = fold_in(key, count)
    index = torch.arange(2 * n, dtype=torch.int64, device=key.device)
    bits = hash32(stream + hash32(index))
    uniform = (bits.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1)
    u1, u2 = uniform[0::2], uniform[1::2]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype)
