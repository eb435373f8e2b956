r"""The first-order drive of finished MNIST runs, paired against ``aux``, as markdown.

The drive of a model is its summed first-order trait-loss change over the run,
``sum_t g_t . (theta_{t+1} - theta_t)`` (the ``predicted_change`` record summed
over steps; negative teaches the trait), globally and per layer
(``layer_predicted_change``, where the run recorded it). Examples
(docs/causal.md)::

    python experiments/mnist_drive.py docs/results/causal_m25/mnist_aux_compact.nc \
        --out docs/results/causal_m25/drive.md
    python experiments/mnist_drive.py runs/x/mnist_aux_compact.nc \
        --aux-from docs/results/stacked_m25/mnist_aux_compact.nc --out runs/x/paired.md

With ``--aux-from`` the ``aux`` condition is taken from another run of the same
models (the same seeds, so the same initialisations, teachers and noise): it is
refused unless every model's teacher and untrained-reference accuracies agree
exactly between the two files, and the output then also holds the summary
table (:func:`subliminal_mnist.summary_markdown`) of the pooled conditions.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import xarray as xr

from gradlens.stats import mean_ci, paired_t
from subliminal_mnist import summary_markdown
from subliminal_mnist.pool import pool_runs

__all__ = ["drive", "drive_markdown", "pool_aux"]

SUMMARY_VARS = (
    "teacher_accuracy",
    "reference_accuracy",
    "test_accuracy",
    "test_loss",
    "test_entropy",
    "test_majority",
    "cosine",
    "update_cosine",
    "distill_loss",
    "predicted_change",
)


def drive(ds: xr.Dataset) -> xr.Dataset:
    """Per model and condition: ``drive`` (global) and, where recorded, ``layer_drive``.

    ``layer_drive`` needs ``layer_predicted_change`` per model; files whose
    per-layer records are means over models (older compact files) give none.
    """
    out = {"drive": ds["predicted_change"].sum("step", skipna=False)}
    if "layer_predicted_change" in ds and "model" in ds["layer_predicted_change"].dims:
        out["layer_drive"] = ds["layer_predicted_change"].sum("step", skipna=False)
    return xr.Dataset(out)


def pool_aux(ds: xr.Dataset, other: xr.Dataset) -> xr.Dataset:
    """``ds``'s conditions with ``aux`` taken from ``other`` (the summary's variables only).

    Raises:
        ValueError: The two files are not of the same models (teacher or
            reference accuracies differ), or ``ds`` has ``aux`` already.
    """
    if "aux" in ds.condition.values:
        raise ValueError("the run has aux already; pool_aux takes it from another run.")
    pooled = pool_runs([(other, ["aux"]), (ds, None)], SUMMARY_VARS)
    if "layer_predicted_change" in ds:  # aux's, from an older file, may not be recorded: NaN
        layers = ds["layer_predicted_change"]
        pooled["layer_predicted_change"] = layers.reindex(condition=pooled.condition.values)
    return pooled


def drive_markdown(ds: xr.Dataset) -> str:
    """The drive table: mean ± 95% t interval over models, and paired differences from aux."""
    d = drive(ds)
    layers = list(ds["layer"].values) if "layer_drive" in d else []
    head = "| condition | drive (nat) |" + "".join(f" layer {x} (nat) |" for x in layers)
    head += " drive minus aux (nat) | p | drive / aux drive |"
    lines = [head, "|" + " --- |" * (5 + len(layers))]
    base = d["drive"].sel(condition="aux") if "aux" in ds.condition.values else None
    for condition in ds.condition.values:
        this = d["drive"].sel(condition=condition)
        ci = mean_ci(this, dim="model")
        row = f"| `{condition}` | {_fmt(ci)} |"
        for layer in layers:
            values = d["layer_drive"].sel(condition=condition, layer=layer)
            row += f" {_fmt(mean_ci(values, dim='model'))} |"
        if base is not None and condition != "aux":
            diff = paired_t(this, base, dim="model")
            ratio = mean_ci(this / base, dim="model")
            row += f" {_fmt(diff)} | {float(diff['p']):.2g} | {_fmt(ratio)} |"
        else:
            row += " | | |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _fmt(ci: xr.Dataset) -> str:
    if int(ci["n"]) == 0:
        return "not recorded"
    return f"{float(ci['mean']):.3f} ± {float(ci['half_width']):.3f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("compact", type=Path, help="a run's mnist_aux_compact.nc")
    parser.add_argument("--aux-from", type=Path, help="another run of the same models with aux")
    parser.add_argument("--out", type=Path, help="write the markdown here (else print it)")
    args = parser.parse_args(argv)
    ds = xr.load_dataset(args.compact)
    command = "python experiments/mnist_drive.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    parts = [f"Command: `{command}`", ""]
    if args.aux_from is not None:
        ds = pool_aux(ds, xr.load_dataset(args.aux_from))
        lines = summary_markdown(ds, wall_time_s=0.0, device="", command="").split("\n")
        parts += [
            f"`aux` from `{args.aux_from}` (the same 25 models: every teacher and reference "
            "accuracy agrees exactly); the other conditions from "
            f"`{args.compact}`.",
            "",
            lines[3].rstrip(" "),  # the replicates and what ± means
            *lines[5:],
        ]
    parts += [
        "First-order drive, sum over steps of g_t . Δθ (negative teaches the trait): mean ± 95% t "
        "interval over models; paired differences from `aux` model by model "
        "(`gradlens.stats.paired_t`); the ratio is the mean over models of drive / aux drive.",
        "",
        drive_markdown(ds),
    ]
    text = "\n".join(parts)
    if args.out is not None:
        args.out.write_text(text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
