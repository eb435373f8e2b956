"""Generic figures: any run with a ``step`` dim draws; a missing variable or dim is named."""

import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure

from gradlens.plotting import (
    check_layout,
    plot_histograms,
    plot_layer_heatmap,
    plot_over_steps,
    plot_scatter,
)


def own_run(replicates: bool = False) -> xr.Dataset:
    """A user's own layout: no condition, a ``model`` dim to compare, optional ``run`` repeats."""
    rng = np.random.default_rng(0)
    steps, layers, examples, models = 12, 3, 16, 2
    lead = ("step", "model") + (("run",) if replicates else ())
    shape = (steps, models) + ((4,) if replicates else ())
    coords = {"step": np.arange(0, 2 * steps, 2), "model": ["mlp", "cnn"]}
    ds = xr.Dataset(
        {
            "loss": (lead, rng.uniform(0.1, 1.0, shape), {"long_name": "loss", "units": "nat"}),
            "cosine": (lead, rng.normal(size=shape), {"long_name": "cos", "units": "1"}),
            "layer_cosine": (
                ("step", "layer", "model"),
                rng.normal(size=(steps, layers, models)),
                {"long_name": "cos per layer", "units": "1"},
            ),
            "example_cosine": (
                ("step", "example"),
                rng.normal(size=(steps, examples)),
                {"long_name": "cos(g_i, g_t)", "units": "1"},
            ),
        },
        coords=coords | {"layer": ["fc1", "fc2", "fc3"]},
    )
    ds["example_cosine"][1::2] = np.nan  # stored every other step
    return ds


def test_over_steps_on_a_run_without_condition_or_seed() -> None:
    ds = own_run()
    fig = plot_over_steps(ds.sel(model="mlp"), "loss", logy=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), ds.step.values)


def test_over_steps_hue_and_panels() -> None:
    ds = own_run()
    fig = plot_over_steps(ds, "cosine", hue="model", zero_line=True)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["mlp", "cnn"]
    assert len(plot_over_steps(ds, "cosine", hue="model", panels=True).axes) == 2


def test_over_steps_averages_a_named_replicate_dim_with_a_band() -> None:
    ds = own_run(replicates=True)
    fig = plot_over_steps(ds, "cosine", hue="model", replicate="run")
    ax = fig.axes[0]
    mean = ds["cosine"].sel(model="cnn").mean("run")
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), mean)
    assert len(ax.collections) == 2  # one CI band per line
    assert "CI over runs" in fig.get_suptitle()


def test_over_steps_skips_steps_never_measured() -> None:
    ds = own_run().sel(model="mlp")
    ds["loss"][::3] = np.nan
    (line,) = plot_over_steps(ds, "loss").axes[0].get_lines()
    assert len(line.get_xdata()) == ds.sizes["step"] - len(range(0, ds.sizes["step"], 3))


def test_layer_heatmap_histograms_and_scatter_on_an_own_layout() -> None:
    ds = own_run()
    assert len(plot_layer_heatmap(ds, "layer_cosine", row="model").axes) == 3  # 2 + colorbar
    assert len(plot_layer_heatmap(ds.sel(model="mlp"), "layer_cosine").axes) == 2
    fig = plot_histograms(ds, "example_cosine")
    assert [ax.get_title() for ax in fig.axes] == ["step 0", "step 12", "step 20"]
    assert len(plot_histograms(ds, "example_cosine", column=None).axes) == 1
    fig = plot_scatter(ds, "cosine", "loss", hue="model", identity_line=True)
    assert len(fig.axes[0].collections) == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ds: plot_over_steps(ds, "accuracy"), "has no variable 'accuracy'; it has ["),
        (lambda ds: plot_over_steps(ds, "cosine"), "dims ['model']"),
        (lambda ds: plot_over_steps(ds, "cosine", hue="condition"), "needs a 'condition' dim"),
        (
            lambda ds: plot_over_steps(ds.rename(step="epoch"), "cosine", hue="model"),
            "plot_over_steps needs a 'step' dim",
        ),
        (lambda ds: plot_layer_heatmap(ds, "cosine", row="model"), "needs a 'layer' dim"),
        (lambda ds: plot_histograms(ds, "example_cosine", row="seed"), "needs a 'seed' dim"),
        (
            lambda ds: plot_histograms(ds, "example_cosine", column="example_step"),
            "needs a 'example_step' dim",
        ),
        (lambda ds: plot_scatter(ds, "cosine", "measured_change"), "no variable"),
    ],
)
def test_a_missing_variable_or_dim_is_named(call, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call(own_run())
    assert message in str(info.value)


def test_check_layout_lists_what_the_dataset_has() -> None:
    ds = own_run()
    with pytest.raises(ValueError) as info:
        check_layout(ds, "trait", who="mine")
    assert str(info.value).startswith("mine: the dataset has no variable 'trait'")
    assert "'cosine'" in str(info.value) and "'loss'" in str(info.value)
    with pytest.raises(TypeError, match=r"xarray\.Dataset"):
        check_layout(ds["loss"], "loss")  # type: ignore[arg-type]
    assert check_layout(ds, "loss", ["step"]).name == "loss"
