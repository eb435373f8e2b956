"""A combined run cut to a size that can be committed beside the docs.

The combined file of a run with many models holds every probe of every model
at every step and the per-example cosines: tens of MB. :func:`compact_results`
keeps what the summary, the figures and the docs cite:

- per step and model: the alignment and loss records of :data:`PER_MODEL`;
- at the evaluation steps only, per model: :data:`AT_EVALUATION` (test metrics
  and the held-out probe, NaN elsewhere in the full file);
- per step, averaged over models (variables named unchanged, with no
  ``model`` dim and ``"mean over models"`` in ``long_name``): everything else
  with a ``model`` dim (per-layer values, quantiles, transform states);
- per model and layer, the run mean of ``layer_cosine`` as ``layer_cosine_run_mean``;
- the teachers' and references' accuracies; no per-example values.

:func:`subliminal_mnist.final_values` and :func:`subliminal_mnist.headline_table`
give the same numbers on the compact file as on the full one (tested).
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from gradlens.records.atomic import atomic_write

__all__ = ["AT_EVALUATION", "COMPACT", "PER_MODEL", "compact_results", "write_compact"]

COMPACT = "mnist_aux_compact.nc"

PER_MODEL: tuple[str, ...] = (
    "cosine",
    "applied_cosine",
    "update_cosine",
    "momentum_cosine",
    "trait_loss",
    "distill_loss",
    "train_loss",
    "predicted_change",
    "layer_predicted_change",
    "measured_change",
    "example_cosine_mean",
    "trait_norm",
    "train_norm",
    "liminal_kl_loss",
    "distill_cosine",
    "liminal_kl_cosine",
    "distill_norm",
    "liminal_kl_norm",
)
"""Variables kept per step and model (the ``liminal_*`` and ``distill_*`` ones in
liminal conditions only)."""

AT_EVALUATION: tuple[str, ...] = (
    "test_accuracy",
    "test_loss",
    "test_entropy",
    "test_majority",
    "heldout_trait_loss",
    "heldout_cosine",
    "heldout_update_cosine",
)
"""Variables kept per model at the evaluation steps (dim ``eval_step``)."""


def compact_results(ds: xr.Dataset) -> xr.Dataset:
    """The compact form of a combined run with a ``model`` dim (see the module docstring).

    Raises:
        ValueError: ``ds`` has no ``model`` dim.
    """
    if "model" not in ds.dims:
        raise ValueError(
            "compact_results needs a combined run with a 'model' dim "
            "(subliminal_mnist.combine_blocks); this one has dims "
            f"{sorted(map(str, ds.dims))}."
        )
    out = xr.Dataset(attrs=dict(ds.attrs))
    accuracy = ds["test_accuracy"]
    evaluated = accuracy.notnull().any([d for d in accuracy.dims if d != "step"])
    eval_steps = ds["step"].values[evaluated.values]
    for name, var in ds.data_vars.items():
        if "example" in var.dims or "example_step" in var.dims:
            continue
        if "model" not in var.dims or "step" not in var.dims:
            out[name] = var
        elif name in PER_MODEL:
            out[name] = var.astype("float32")
        elif name in AT_EVALUATION:
            out[name] = var.sel(step=eval_steps).rename(step="eval_step").astype("float32")
        else:
            mean = var.mean("model").astype("float32")
            long_name = f"{var.attrs.get('long_name', name)}, mean over models"
            mean.attrs = {**var.attrs, "long_name": long_name}
            out[name] = mean
    if "layer_cosine" in ds:
        run_mean = ds["layer_cosine"].mean("step").astype("float32")
        run_mean.attrs = {"long_name": "cos(g_t, g) per layer, mean over steps", "units": "1"}
        out["layer_cosine_run_mean"] = run_mean
    for coord in ("epoch", "seed"):
        if coord in ds.coords:
            out = out.assign_coords({coord: ds[coord]})
    for variable in out.variables.values():
        variable.encoding = {}
    return out


def write_compact(ds: xr.Dataset, out: Path) -> Path:
    """Write :func:`compact_results` of ``ds`` to ``out/mnist_aux_compact.nc``, atomically."""
    compact = compact_results(ds)
    encoding = {
        name: {"zlib": True, "complevel": 6}
        for name, var in compact.data_vars.items()
        if var.dtype.kind == "f"
    }
    return atomic_write(
        out / COMPACT, lambda tmp: compact.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
    )
