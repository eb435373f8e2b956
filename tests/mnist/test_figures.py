"""The MNIST figure set, on a small synthetic run of the combined layout."""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from subliminal_mnist import draw_figures, save_figures

NAMES = [
    "alignment.png",
    "accuracy.png",
    "distill_loss.png",
    "update_alignment.png",
    "layer_alignment.png",
    "predicted_vs_measured.png",
    "accuracy_vs_alignment.png",
    "accuracy_vs_update_alignment.png",
    "example_histograms.png",
]


def combined_run() -> xr.Dataset:
    rng = np.random.default_rng(0)
    s, layers, es, e, c, n = 10, 3, 2, 8, 2, 3
    per_step = ("step", "condition", "seed")

    def var(dims: tuple[str, ...], shape: tuple[int, ...], low: float = -1.0) -> tuple:
        return dims, rng.uniform(low, 1.0, shape), {"long_name": dims[0], "units": "1"}

    ds = xr.Dataset(
        {
            name: var(per_step, (s, c, n), low=low)
            for name, low in [
                ("cosine", -1.0),
                ("update_cosine", -1.0),
                ("test_accuracy", 0.0),
                ("distill_loss", 0.1),
                ("predicted_change", -1.0),
                ("measured_change", -1.0),
            ]
        }
        | {
            "layer_cosine": var(("step", "layer", "condition", "seed"), (s, layers, c, n)),
            "example_cosine": var(("example_step", "example", "condition", "seed"), (es, e, c, n)),
        },
        coords={
            "step": np.arange(s),
            "example_step": [0, 5],
            "layer": ["0", "2", "4"],
            "condition": ["aux", "cross_init"],
            "seed": np.arange(n),
        },
    )
    ds["test_accuracy"][::2] = np.nan  # evaluated every other step
    return ds


def test_the_nine_figures_are_drawn_and_saved(tmp_path: Path) -> None:
    ds = combined_run()
    assert list(draw_figures(ds)) == NAMES
    paths = save_figures(ds, tmp_path / "figures")
    assert [p.name for p in paths] == NAMES and all(p.stat().st_size > 0 for p in paths)


def test_a_run_without_conditions_is_told_what_the_figures_need() -> None:
    ds = combined_run().isel(condition=0, drop=True)
    with pytest.raises(ValueError, match="needs a 'condition' dim"):
        draw_figures(ds)


def test_thirteen_conditions_get_thirteen_colours_and_keep_them_after_drawing() -> None:
    """The 13 conditions of the 10-model run are each drawn in their own colour, resolved
    when drawn (not at save time under whatever colour cycle is then current)."""
    ds = combined_run()
    names = [f"c{i}" for i in range(13)]
    ds = xr.concat([ds.isel(condition=0, drop=True)] * 13, dim="condition")
    ds = ds.assign_coords(condition=names)
    accuracy = draw_figures(ds)["accuracy.png"]
    colours = [tuple(line.get_color()) for line in accuracy.axes[0].get_lines()]
    assert len(colours) == 13 and len(set(colours)) == 13
    legend = [tuple(h.get_color()) for h in accuracy.axes[0].get_legend().legend_handles]
    assert legend == colours


def test_accuracy_intervals_are_clipped_to_0_1_and_compact_files_skip_histograms() -> None:
    ds = combined_run().drop_vars("example_cosine")
    ds["test_accuracy"] = ds["test_accuracy"].where(ds["test_accuracy"].isnull(), 0.01)
    ds["test_accuracy"][-1, 0, 0] = 0.99  # a wide interval around a mean near 0.34
    figures = draw_figures(ds)
    assert "example_histograms.png" not in figures
    ax = figures["accuracy_vs_alignment.png"].axes[0]
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    ys = [y for seg in segments for _, y in seg]
    assert ys and min(ys) >= 0.0 and max(ys) <= 1.0


def test_accuracy_against_alignment_uses_the_gradient_after_the_intervention() -> None:
    ds = combined_run()
    ds["applied_cosine"] = ds["cosine"] * 0 + 5.0  # far from the raw cosines in [-1, 1]
    ax = draw_figures(ds)["accuracy_vs_alignment.png"].axes[0]
    xs = [float(line.get_xdata()[0]) for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert xs and all(abs(x - 5.0) < 1e-9 for x in xs)
    assert "after the intervention" in ax.get_xlabel()
