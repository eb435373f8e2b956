"""The experiment's figure: the change in trait probability over student steps, per condition."""

from __future__ import annotations

from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

from gradlens.figures import plot_over_steps

__all__ = ["draw_figure", "save_figure"]


def draw_figure(ds: xr.Dataset) -> Figure:
    """``trait_prob`` minus its value at step 0, one line per condition, a 95% t band over seeds.

    The change, not the level: the bases' own trait probabilities differ from
    seed to seed more than the students move.
    """
    change = ds["trait_prob"] - ds["trait_prob"].isel(step=0)
    change.attrs = {"long_name": "change in p(trait answer | question) since step 0"}
    return plot_over_steps(
        xr.Dataset({"trait_prob_change": change}),
        "trait_prob_change",
        hue="condition",
        replicate="seed",
        ylabel="change in trait p",
        zero_line=True,
    )


def save_figure(ds: xr.Dataset, path: Path) -> Path:
    """Draw :func:`draw_figure` and save it as a PNG at ``path``."""
    draw_figure(ds).savefig(path, dpi=120)
    return path
