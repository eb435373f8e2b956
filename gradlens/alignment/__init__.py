"""Gradient dicts and how they line up: the algebra and the alignment statistics.

- :mod:`gradlens.alignment.gradops`: arithmetic on ``dict[str, Tensor]`` gradients;
- :mod:`gradlens.alignment.layerstats`: per-layer (or global) inner products and
  norms, the one implementation behind every per-layer statistic;
- :mod:`gradlens.alignment.measures`: :func:`alignment`, :func:`example_alignment`
  and :func:`summarize`.
"""

from __future__ import annotations

from gradlens.alignment.layerstats import LayerStats, Scope, layer_stats
from gradlens.alignment.measures import (
    QUANTILES,
    Alignment,
    ExampleAlignment,
    alignment,
    example_alignment,
    summarize,
)

__all__ = [
    "QUANTILES",
    "Alignment",
    "ExampleAlignment",
    "LayerStats",
    "Scope",
    "alignment",
    "example_alignment",
    "layer_stats",
    "summarize",
]
