"""The experiment's figures: trait probability, fit, alignment and drive over student steps.

Each draws one line per condition with a 95% Student-t band over seeds
(:func:`gradlens.figures.plot_over_steps`), from the combined or the compact file.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr
from matplotlib.figure import Figure

from gradlens.figures import plot_over_steps

__all__ = ["FIGURES", "draw_figure", "draw_figures", "save_figure", "save_figures"]

FIGURES: tuple[str, ...] = (
    "trait_prob.png",
    "train_loss.png",
    "alignment.png",
    "drive.png",
    "drift_cosine.png",
)
"""The PNG files :func:`save_figures` writes."""


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


def draw_figures(ds: xr.Dataset) -> dict[str, Figure]:
    """Every figure of :data:`FIGURES`, keyed by its file name.

    - ``trait_prob.png``: :func:`draw_figure`.
    - ``train_loss.png``: the student's loss on its batch (log scale): does it fit its data.
    - ``alignment.png``: cos(g_t, g), one panel per condition.
    - ``drive.png``: the cumulative first-order drive, the running sum of
      ``predicted_change`` (g_t · update) over steps: the trait loss's change
      to first order so far (negative: the steps teach the trait).
    - ``drift_cosine.png``: cos(student - init, teacher - base) after each step.
    """
    over_steps = {"hue": "condition", "replicate": "seed"}
    drive = (
        ds["predicted_change"].fillna(0.0).cumsum("step").where(ds["predicted_change"].notnull())
    )
    drive.attrs = {"long_name": "cumulative g_t . update (first-order trait-loss change)"}
    return {
        "trait_prob.png": draw_figure(ds),
        "train_loss.png": plot_over_steps(
            ds, "train_loss", ylabel="training loss (nat)", logy=True, **over_steps
        ),
        "alignment.png": plot_over_steps(
            ds, "cosine", ylabel="cos(g_t, g)", zero_line=True, panels=True, **over_steps
        ),
        "drive.png": plot_over_steps(
            xr.Dataset({"drive": drive}),
            "drive",
            ylabel="cumulative g_t . update (nat)",
            zero_line=True,
            **over_steps,
        ),
        "drift_cosine.png": plot_over_steps(
            ds,
            "drift_cosine",
            ylabel="cos(student - init, teacher - base)",
            zero_line=True,
            **over_steps,
        ),
    }


def save_figure(ds: xr.Dataset, path: Path) -> Path:
    """Draw :func:`draw_figure` and save it as a PNG at ``path``."""
    draw_figure(ds).savefig(path, dpi=120)
    return path


def save_figures(ds: xr.Dataset, out: Path) -> list[Path]:
    """Draw :func:`draw_figures` and save each as a PNG in the folder ``out``."""
    paths = []
    for name, figure in draw_figures(ds).items():
        figure.savefig(out / name, dpi=120)
        paths.append(out / name)
    return paths
