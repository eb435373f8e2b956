"""Generic figures: any run with a ``step`` dim draws; a missing variable or dim is named."""

import re

import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure

from gradlens.figures.plots import (
    check_layout,
    plot_histograms,
    plot_layer_heatmap,
    plot_over_steps,
    plot_scatter,
    plot_transform_cosine,
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


def test_histograms_mark_each_panels_mean_and_its_fraction_above_zero() -> None:
    ds = own_run()
    values = ds["example_cosine"].sel(step=0).values.ravel()
    values = values[np.isfinite(values)]
    ax = plot_histograms(ds, "example_cosine").axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1
    assert dashed[0].get_xdata()[0] == pytest.approx(values.mean())
    (text,) = ax.texts
    assert text.get_text() == f"mean {values.mean():+.2g}\n{(values > 0).mean():.1%} > 0"
    plain = plot_histograms(ds, "example_cosine", mark_mean=False).axes[0]
    assert not plain.texts and all(line.get_linestyle() != "--" for line in plain.get_lines())
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


def conditions_run() -> xr.Dataset:
    """Three conditions of very different scales, 4 seeds, and transform records."""
    rng = np.random.default_rng(1)
    steps, conditions, seeds = 10, ["big", "small", "none"], 4
    scale = np.array([100.0, 0.01, 1.0])[None, :, None]
    predicted = rng.normal(size=(steps, 3, seeds)) * scale
    layer = rng.normal(size=(steps, 3, 3, seeds)) * scale[:, None]
    # transform_cosine (step, placement, transform, stage, group, condition, seed): one
    # (placement, transform) per condition, NaN elsewhere, as a probed step records them.
    cos = np.full((steps, 2, 2, 2, 2, 3, seeds), np.nan)
    cos[:, 0, 0, 0, :, 0] = 0.3  # big: before placement, transform "remove", cosine before
    cos[:, 0, 0, 1, :, 0] = 0.0  # ... and after
    cos[:, 1, 1, 0, :, 1] = 0.2  # small: after placement, transform "reverse"
    cos[:, 1, 1, 1, :, 1] = -0.2
    dims = ("step", "placement", "transform", "stage", "group", "condition", "seed")
    return xr.Dataset(
        {
            "predicted_change": (
                ("step", "condition", "seed"),
                predicted,
                {"long_name": "predicted change", "units": "nat"},
            ),
            "measured_change": (
                ("step", "condition", "seed"),
                predicted * 0.9,
                {"long_name": "measured change", "units": "nat"},
            ),
            "layer_cosine": (
                ("step", "layer", "condition", "seed"),
                layer,
                {"long_name": "cos per layer", "units": "1"},
            ),
            "transform_cosine": (dims, cos, {"long_name": "cosine", "units": "1"}),
        },
        coords={
            "step": np.arange(steps),
            "condition": conditions,
            "layer": ["0", "2", "4"],
            "placement": ["before", "after"],
            "transform": ["remove", "reverse"],
            "stage": ["before", "after"],
            "group": ["all", "0"],
        },
    )


def test_scatter_has_a_panel_per_condition_with_units_and_a_legend() -> None:
    ds = conditions_run()
    fig = plot_scatter(
        ds, "predicted_change", "measured_change", panel="condition", identity_line=True
    )
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [
        "condition = big", "condition = small", "condition = none"
    ]  # fmt: skip
    for ax, name in zip(visible, ["big", "small", "none"], strict=True):
        assert ax.get_xlabel() == "predicted change [nat]"
        assert ax.get_ylabel() == "measured change [nat]"
        (points,) = ax.collections
        # Each panel holds only its condition's points, on its own range.
        expected = ds["predicted_change"].sel(condition=name).values.ravel()
        np.testing.assert_allclose(points.get_offsets()[:, 0], expected)
        assert ax.get_xlim()[1] < 5 * np.abs(expected).max()


def test_scatter_hue_values_differ_in_colour_and_marker() -> None:
    ds = conditions_run()
    fig = plot_scatter(ds, "predicted_change", "measured_change", hue="condition")
    ax = fig.axes[0]
    paths = [c.get_paths()[0].vertices.tobytes() for c in ax.collections]
    colours = [tuple(c.get_facecolor()[0]) for c in ax.collections]
    assert len(set(paths)) == 3 and len(set(colours)) == 3
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["big", "small", "none"]
    assert legend.get_title().get_text() == "condition"


def test_heatmap_selects_rows_scales_each_and_names_layers() -> None:
    ds = conditions_run()
    fig = plot_layer_heatmap(
        ds,
        row="condition",
        select=["small", "none"],
        scale="row",
        layer_labels={"0": "fc1", "2": "fc2", "4": "out"},
    )
    panels = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in panels] == ["condition = small", "condition = none"]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["fc1", "fc2", "out"]
    for ax, name in zip(panels, ["small", "none"], strict=True):
        (mesh,) = ax.collections
        limit = float(np.abs(ds["layer_cosine"].sel(condition=name).mean("seed")).max())
        assert mesh.get_clim() == pytest.approx((-limit, limit))  # centred at 0, per row
        assert mesh.get_cmap().name == "RdBu_r"
    assert len(fig.axes) == 4  # two panels, two colour bars
    assert "red > 0 > blue" in fig.get_suptitle()
    assert fig.axes[2].get_ylabel() == "dimensionless"  # the panel's colour bar: units
    assert "cos per layer [dimensionless]" in fig.get_suptitle()


def test_heatmap_shared_scale_is_set_by_the_largest_row() -> None:
    ds = conditions_run()
    fig = plot_layer_heatmap(ds, row="condition")
    limit = float(np.abs(ds["layer_cosine"].mean("seed")).max())
    for ax in fig.axes[:3]:
        assert ax.collections[0].get_clim() == pytest.approx((-limit, limit))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"row": "condition", "select": ["other"]}, "has no ['other']"),
        ({"select": ["big"]}, "pass row="),
        ({"row": "condition", "scale": "column"}, "scale must be"),
    ],
)
def test_heatmap_validates_its_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        plot_layer_heatmap(conditions_run(), **kwargs)


def test_transform_cosine_draws_after_solid_and_before_dashed() -> None:
    ds = conditions_run()
    fig = plot_transform_cosine(ds.sel(condition=["big", "small"]))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label()[0] != "_"}
    assert set(lines) == {"big, after", "big, before", "small, after", "small, before"}
    np.testing.assert_allclose(lines["big, after"].get_ydata(), 0.0)
    np.testing.assert_allclose(lines["small, after"].get_ydata(), -0.2)
    np.testing.assert_allclose(lines["small, before"].get_ydata(), 0.2)
    assert lines["big, after"].get_linestyle() == "-"
    assert lines["big, before"].get_linestyle() == "--"
    assert lines["big, after"].get_color() == lines["big, before"].get_color()
    assert ax.get_ylabel() == "cosine with the reference [dimensionless]"
    assert "after the transform (solid)" in fig.get_suptitle()
    assert "CI over seeds" in fig.get_suptitle()


def test_transform_cosine_errors_name_the_fix() -> None:
    ds = conditions_run()
    with pytest.raises(ValueError, match=r"0 \(placement, transform\) pairs.*'none'"):
        plot_transform_cosine(ds)  # "none" recorded no transform
    with pytest.raises(ValueError, match="group 'fc9'"):
        plot_transform_cosine(ds, group="fc9")


def test_per_example_values_on_their_own_step_dim_name_the_column() -> None:
    ds = xr.Dataset(
        {"example_cosine": (("example_step", "example"), np.zeros((3, 4)))},
        coords={"example_step": [0, 5, 10]},
    )
    with pytest.raises(ValueError, match="column='example_step'"):
        plot_histograms(ds, "example_cosine")


def test_heatmap_stays_readable_at_96_layers() -> None:
    rng = np.random.default_rng(2)
    layers = [f"model.layers.{i // 8}.part{i % 8}" for i in range(96)]
    ds = xr.Dataset(
        {
            "layer_cosine": (
                ("step", "layer"),
                rng.normal(size=(5, 96)),
                {"long_name": "cos per layer", "units": "1"},
            )
        },
        coords={"step": np.arange(5), "layer": layers},
    )
    few = plot_layer_heatmap(ds.isel(layer=slice(0, 3)))
    fig = plot_layer_heatmap(ds)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) <= 32 and labels[0] == layers[0] and labels[1] == layers[3]
    assert fig.get_figheight() > 3 * few.get_figheight()  # rows of visible height
    assert "96, 1 in 3 labelled" in fig.get_suptitle()
    assert fig.axes[0].yaxis_inverted()  # the first layer on top
