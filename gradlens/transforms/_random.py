"""Seeds for explicit, stateless random draws (private).

A transform's random draws must follow from its state alone and touch no
global random state. Its state holds a ``key`` and a ``count``; each draw
seeds a fresh ``torch.Generator`` with :func:`mix_seed` of the two, so the
same state gives the same numbers (on the same kind of device: CPU and CUDA
generators differ). :func:`mix_seed` is SplitMix64's finaliser, which spreads
nearby ``(key, count)`` pairs over unrelated seeds.

A counter-based hash in tensor ops would also run under ``torch.func.vmap``,
but on a CPU it is far slower than ``torch.randn`` for the millions of entries
of a model's gradient, so it is not used.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's output function of ``x`` (the state after its increment)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix_seed(key: int, count: int) -> int:
    """A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed``, from ``(key, count)``."""
    return _splitmix64(_splitmix64(key & MASK64) ^ (count & MASK64)) >> 1
