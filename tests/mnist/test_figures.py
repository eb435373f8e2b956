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
    "example_histograms.png",
    "predicted_vs_measured.png",
    "accuracy_vs_alignment.png",
    "accuracy_vs_update_alignment.png",
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
