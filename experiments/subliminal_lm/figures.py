"""The experiment's figure: the trait probability over student steps, per condition."""

from __future__ import annotations

from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

from gradlens.figures import plot_over_steps

__all__ = ["draw_figure", "save_figure"]


def draw_figure(ds: xr.Dataset) -> Figure:
    """``trait_prob`` over steps, one line per condition, a 95% t band over seeds."""
    return plot_over_steps(
        ds, "trait_prob", hue="condition", replicate="seed", ylabel="p(trait answer | question)"
    )


def save_figure(ds: xr.Dataset, path: Path) -> Path:
    """Draw :func:`draw_figure` and save it as a PNG at ``path``."""
    draw_figure(ds).savefig(path, dpi=120)
    return path
