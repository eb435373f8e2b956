"""Figures of runs: over steps, per layer, per example, and of the transforms."""

from __future__ import annotations

from gradlens.figures.plots import (
    check_layout,
    plot_histograms,
    plot_layer_heatmap,
    plot_over_steps,
    plot_scatter,
    plot_transform_cosine,
)

__all__ = [
    "check_layout",
    "plot_histograms",
    "plot_layer_heatmap",
    "plot_over_steps",
    "plot_scatter",
    "plot_transform_cosine",
]
