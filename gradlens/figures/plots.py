"""Figures for any recorded run, drawn from its Dataset so they can be redrawn from a file.

The layout these helpers read is the one :class:`gradlens.Recorder` writes
(see docs/recording.md): a variable has a ``step`` dim first, then any of
``layer``, ``example`` and the dims a comparison adds by concatenation, such
as ``condition``, ``seed`` or ``model``. Only ``step`` is required; a
replicate dim (``seed`` by default) is averaged with a confidence band when
the variable has it, and one other dim may be spread over colours (``hue``)
or panels (``row``). A variable or dim that is missing raises a
:class:`ValueError` that names it and what the dataset has instead.

Every function returns a :class:`matplotlib.figure.Figure`; nothing here
touches pyplot's global state, so it works headless and inside other programs.

Example:
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"cosine": (("step",), np.linspace(-0.1, 0.1, 20))})
    >>> fig = plot_over_steps(ds, "cosine", zero_line=True)
    >>> len(fig.axes)
    1
    >>> plot_over_steps(ds, "loss")
    Traceback (most recent call last):
    ...
    ValueError: plot_over_steps: the dataset has no variable 'loss'; it has ['cosine'].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradlens.figures.layout import (
    check_layout,
    check_rest,
    groups_of,
    label_of,
    row_label,
    units_of,
)
from gradlens.figures.transforms import plot_transform_cosine
from gradlens.stats import mean_ci

__all__ = [
    "check_layout",
    "plot_histograms",
    "plot_layer_heatmap",
    "plot_over_steps",
    "plot_scatter",
    "plot_transform_cosine",
]


def plot_over_steps(
    ds: xr.Dataset,
    var: str,
    *,
    hue: str | None = None,
    replicate: str | None = "seed",
    level: float = 0.95,
    panels: bool = False,
    ylabel: str | None = None,
    xlabel: str = "step",
    zero_line: bool = False,
    logy: bool = False,
) -> Figure:
    """A variable over steps: one line per value of ``hue``, with a CI band over replicates.

    Steps where ``var`` was not measured (NaN for every replicate) are skipped.

    Args:
        ds: A run's Dataset.
        var: Variable with dims ``(step,)``, plus optionally ``hue`` and ``replicate``.
        hue: A dim to draw one line (or panel) per value of, e.g. ``"condition"``.
        replicate: A dim of independent repeats to average over with a
            Student-t band, used when ``var`` has it; ``None`` never averages.
        level: Confidence level of the band.
        panels: One panel per ``hue`` value with its own y range, instead of
            one shared axis.
        ylabel: Axis label; default the variable's ``long_name``.
        xlabel: Label of the step axis.
        zero_line: Draw ``y = 0``.
        logy: Logarithmic y axis (for losses).

    Raises:
        ValueError: ``var`` is missing, lacks ``step`` or ``hue``, or has a dim
            beyond these and ``replicate``.
    """
    who = "plot_over_steps"
    da = check_layout(ds, var, ["step"] + ([hue] if hue else []), who=who)
    averaged = replicate if replicate in da.dims else None
    check_rest(da, ["step", hue, averaged], who, "hue")
    groups = groups_of(da, hue)
    rows = len(groups) if panels else 1
    fig = Figure(figsize=(7, 3.5 if rows == 1 else 1.0 + 1.3 * rows), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for i, (name, values) in enumerate(groups):
        ax, color = axes[i if panels else 0], f"C{i}"
        values = values.dropna("step", how="all")
        if averaged:
            ci = mean_ci(values, dim=averaged, level=level)
            ax.plot(values.step, ci["mean"], label=name, lw=1.2, color=color)
            ax.fill_between(values.step, ci["lower"], ci["upper"], color=color, alpha=0.2)
        else:
            ax.plot(values.step, values, label=name, lw=1.2, color=color)
        if zero_line:
            ax.axhline(0.0, color="k", lw=0.6)
        if logy:
            ax.set_yscale("log")
        if panels:
            row_label(ax, name)
    label = ylabel or label_of(da)
    if not panels:
        axes[0].set_ylabel(label)
        if hue:
            axes[0].legend(fontsize="small")
    axes[-1].set_xlabel(xlabel)
    band = f": mean and {level:.0%} CI over {averaged}s" if averaged else ""
    fig.suptitle(label + band)
    return fig


def plot_layer_heatmap(
    ds: xr.Dataset,
    var: str = "layer_cosine",
    *,
    row: str | None = None,
    replicate: str | None = "seed",
    xlabel: str = "step",
    symmetric: bool = True,
    select: Sequence[object] | None = None,
    scale: Literal["shared", "row"] = "shared",
    layer_labels: Mapping[str, str] | None = None,
) -> Figure:
    """Per-layer values over steps as a heatmap, averaged over replicates; a panel per ``row``.

    Args:
        ds: A run's Dataset.
        var: Variable with dims ``(step, layer)``, plus optionally ``row`` and ``replicate``.
        row: A dim to draw one panel per value of, e.g. ``"condition"``.
        replicate: A dim to average over when ``var`` has it.
        xlabel: Label of the step axis.
        symmetric: A diverging colour scale centred on 0 (for signed values
            such as cosines: red above 0, blue below); otherwise the data range.
        select: The values of ``row`` to draw, in this order; default all.
        scale: ``"shared"``: one colour scale for every panel; ``"row"``: each
            panel its own scale and colour bar, so a panel of small values is
            not washed out by a panel of large ones.
        layer_labels: Names to show for the layers (``layer`` coordinate value
            -> label), e.g. ``{"0": "fc1 784-256"}``; default the coordinate values.

    Raises:
        ValueError: ``var`` is missing, lacks ``step``, ``layer`` or ``row``, has
            another dim, ``select`` names a value ``row`` lacks, or ``scale`` is unknown.
    """
    who = "plot_layer_heatmap"
    if scale not in ("shared", "row"):
        raise ValueError(f"{who}: scale must be 'shared' or 'row', got {scale!r}.")
    if select is not None and row is None:
        raise ValueError(f"{who}: select= picks values of row=; pass row= too.")
    da = check_layout(ds, var, ["step", "layer"] + ([row] if row else []), who=who)
    averaged = replicate if replicate in da.dims else None
    check_rest(da, ["step", "layer", row, averaged], who, "row")
    mean = da.mean(averaged) if averaged else da
    if select is not None:
        have = [str(v) for v in mean[row].values]
        unknown = [v for v in select if str(v) not in have]
        if unknown:
            raise ValueError(f"{who}: {row} has no {unknown}; it has {have}.")
        mean = mean.isel({row: [have.index(str(v)) for v in select]})
    groups = groups_of(mean, row)
    label = label_of(da)
    colours = "colour: red > 0 > blue" if symmetric else "colour: low (dark) to high (light)"
    layers = mean.sizes["layer"]
    fig = Figure(figsize=(7.5, 1.2 + _panel_height(layers) * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    shared = _colour_scale(mean.values, symmetric)
    for ax, (name, values) in zip(axes, groups, strict=True):
        values = values.transpose("layer", "step")
        ticks = np.arange(values.sizes["layer"])
        colour = shared if scale == "shared" else _colour_scale(values.values, symmetric)
        image = ax.pcolormesh(values.step, ticks, values, shading="nearest", **colour)
        names = [(layer_labels or {}).get(str(v), str(v)) for v in values.layer.values]
        shown = _tick_stride(len(names))
        ax.set_yticks(ticks[::shown], names[::shown], fontsize=_tick_size(len(names)))
        ax.invert_yaxis()  # the first layer (the input side) on top, as the model is read
        if name is not None:
            ax.set_title(f"{row} = {name}", fontsize="small", loc="left")
        if scale == "row":
            fig.colorbar(image, ax=ax, label=units_of(da))
    axes[-1].set_xlabel(xlabel)
    if scale == "shared":
        fig.colorbar(image, ax=list(axes), label=label)
    over = f", mean over {averaged}s" if averaged else ""
    per = "one scale per panel" if scale == "row" else "one scale"
    every = _tick_stride(layers)
    rows = "rows: layers" + (f" ({layers}, 1 in {every} labelled)" if every > 1 else "")
    fig.suptitle(f"{label}{over}\n{rows}; {colours}, {per}", fontsize="medium")
    return fig


_MAX_LAYER_TICKS = 32
"""At most this many layer names on a panel's axis; deeper models label every k-th layer."""


def _panel_height(layers: int) -> float:
    """Inches per heatmap panel: 1.1 for a few layers, growing to 6 for 88+ (rows stay visible)."""
    return min(6.0, max(1.1, 0.07 * layers))


def _tick_stride(layers: int) -> int:
    """Label every k-th layer so that at most ``_MAX_LAYER_TICKS`` names share an axis."""
    return max(1, -(-layers // _MAX_LAYER_TICKS))


def _tick_size(layers: int) -> str:
    """Font size of the layer names: smaller once a panel holds many rows."""
    return "small" if layers <= 12 else "x-small"


def _colour_scale(values: np.ndarray, symmetric: bool) -> dict[str, object]:
    """``pcolormesh`` colour arguments: diverging about 0 over ``±max|v|``, or viridis."""
    finite = values[np.isfinite(values)]
    if symmetric:
        limit = (float(np.abs(finite).max()) if finite.size else 0.0) or 1.0
        return {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit}
    return {"cmap": "viridis"}


def _picks(da: xr.DataArray, column: str, at: Sequence[object] | None) -> list[object]:
    """The ``column`` values to draw: ``at``, else an early, a middle and a late measured one."""
    if at is not None:
        return list(at)
    others = [d for d in da.dims if d != column]
    present = da.notnull().any(others) if others else da.notnull()
    measured = da[column].values[present.values]
    if measured.size == 0:
        raise ValueError(f"plot_histograms: {da.name!r} has no finite value at any {column}.")
    return list(dict.fromkeys([measured[0], measured[len(measured) // 2], measured[-1]]))


def plot_histograms(
    ds: xr.Dataset,
    var: str,
    *,
    column: str | None = "step",
    at: Sequence[object] | None = None,
    row: str | None = None,
    bins: int = 50,
    symmetric: bool = True,
    mark_mean: bool = True,
    xlabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Histograms of per-example values: a column per picked step, a row per ``row`` value.

    Every dim other than ``column`` and ``row`` (``example``, ``seed``, ...)
    is pooled into each histogram.

    Args:
        ds: A run's Dataset.
        var: Variable of per-example values, e.g. dims ``(step, example)``.
        column: The dim to pick columns from (a step dim); ``None`` pools
            everything into one column.
        at: Values of ``column`` to draw; default an early, a middle and a late
            one among those where ``var`` was measured.
        row: A dim to draw one row per value of, e.g. ``"condition"``; each
            row has its own x range.
        bins: Number of bins.
        symmetric: Bins symmetric about 0 with a line at 0 (for signed values).
        mark_mean: Mark each panel's mean with a dashed red line and write the
            mean and the fraction of values above 0 in its corner: a shift far
            smaller than the spread, which a histogram alone hides, is then read.
        xlabel: Label of the value axis; default the variable's ``long_name``.
        title: Figure title.

    Raises:
        ValueError: ``var`` is missing or lacks ``column`` or ``row``.
    """
    who = "plot_histograms"
    needed = [d for d in (column, row) if d]
    if var in ds and column == "step" and "step" not in ds[var].dims:
        steps = [d for d in ds[var].dims if str(d).endswith("_step")]
        if steps:
            raise ValueError(
                f"{who}: {var!r} is recorded along {steps[0]!r}, not 'step' (per-example "
                f"values are logged every few steps on their own dim): pass "
                f"column={steps[0]!r}."
            )
    da = check_layout(ds, var, needed, who=who)
    picks = _picks(da, column, at) if column else [None]
    groups = groups_of(da, row)
    fig = Figure(figsize=(3 * len(picks), 1.0 + 1.4 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(picks), sharey="row", squeeze=False)
    for ax_row, (name, values) in zip(axes, groups, strict=True):
        finite = values.values[np.isfinite(values.values)]
        if symmetric:
            lim = float(np.quantile(np.abs(finite), 0.995)) if finite.size else 0.0
            edges = np.linspace(-(lim or 1.0), lim or 1.0, bins + 1)
        else:
            lo, hi = np.quantile(finite, [0.0025, 0.9975]) if finite.size else (0.0, 1.0)
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for ax, pick in zip(ax_row, picks, strict=True):
            v = (values if column is None else values.sel({column: pick})).values.ravel()
            v = v[np.isfinite(v)]
            ax.hist(v, bins=edges, color="C0", alpha=0.8)
            if symmetric:
                ax.axvline(0.0, color="k", lw=0.6)
            if mark_mean and v.size:
                mean = float(v.mean())
                ax.axvline(mean, color="C3", lw=1.0, ls="--")
                ax.text(
                    0.02,
                    0.95,
                    f"mean {mean:+.2g}\n{(v > 0).mean():.1%} > 0",
                    transform=ax.transAxes,
                    va="top",
                    fontsize="x-small",
                    color="C3",
                )
            ax.tick_params(labelsize="small")
        row_label(ax_row[0], name)
    if column:
        for ax, pick in zip(axes[0], picks, strict=True):
            ax.set_title(f"step {pick}" if column.endswith("step") else f"{column} = {pick}")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel or label_of(da))
    fig.suptitle(title or f"{label_of(da)} (counts)")
    return fig


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
"""Marker shapes, one per ``hue`` value in turn, so that colours are not the only cue."""


def plot_scatter(
    ds: xr.Dataset,
    x: str,
    y: str,
    *,
    hue: str | None = None,
    panel: str | None = None,
    identity_line: bool = False,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """Every recorded value of ``y`` against ``x`` (broadcast together), by ``hue`` or ``panel``.

    With ``panel``, each value of that dim gets its own axes and ranges (and
    its own ``y = x`` line), so one condition's spread cannot hide another's.
    Each ``hue`` value gets its own colour and marker shape, named in the legend.

    Args:
        ds: A run's Dataset.
        x: Variable on the x axis.
        y: Variable on the y axis, with dims that broadcast against ``x``'s.
        hue: A dim of both to colour by, e.g. ``"condition"``.
        panel: A dim of both to draw one panel per value of, e.g. ``"condition"``.
        identity_line: Draw ``y = x`` over the data range (of each panel).
        xlabel: Default the ``long_name`` and units of ``x``.
        ylabel: Default the ``long_name`` and units of ``y``.
        title: Figure title.

    Raises:
        ValueError: ``x`` or ``y`` is missing, or lacks ``hue`` or ``panel``.
    """
    who = "plot_scatter"
    needed = [d for d in (hue, panel) if d]
    xs, ys = xr.broadcast(
        check_layout(ds, x, needed, who=who), check_layout(ds, y, needed, who=who)
    )
    panels = list(zip(groups_of(xs, panel), groups_of(ys, panel), strict=True))
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(3.6 * columns, 0.6 + 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, ((name, px), (_, py)) in zip(axes, panels, strict=False):
        _scatter_panel(ax, px, py, hue, identity_line)
        if name is not None:
            ax.set_title(f"{panel} = {name}", fontsize="small")
        ax.set_xlabel(xlabel or label_of(xs), fontsize="small")
        ax.set_ylabel(ylabel or label_of(ys), fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize="x-small")
    if title:
        fig.suptitle(title)
    return fig


def _scatter_panel(
    ax: Axes, xs: xr.DataArray, ys: xr.DataArray, hue: str | None, identity_line: bool
) -> None:
    lo, hi = np.inf, -np.inf
    for i, ((name, px), (_, py)) in enumerate(
        zip(groups_of(xs, hue), groups_of(ys, hue), strict=True)
    ):
        p, m = px.values.ravel(), py.values.ravel()
        ok = np.isfinite(p) & np.isfinite(m)
        marker = MARKERS[i % len(MARKERS)]
        ax.scatter(p[ok], m[ok], s=6, alpha=0.5, label=name, color=f"C{i}", marker=marker)
        if ok.any():
            lo, hi = min(lo, p[ok].min(), m[ok].min()), max(hi, p[ok].max(), m[ok].max())
    if identity_line and np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.6, label="y = x")
    if hue or identity_line:
        ax.legend(fontsize="x-small", markerscale=2, title=hue, title_fontsize="x-small")
