r"""The dose-response of the trait-aligned update, from finished MNIST runs of the same models.

``aux`` keeps all of each Adam update's component along g_t (alpha = 1),
``scale_update_<alpha>`` the fraction alpha, ``remove_update`` none (alpha = 0).
Each ``--run`` names a compact results file and, after a colon, the conditions
to take from it (default: all); runs are pooled only if every model's teacher and
untrained-reference accuracies agree exactly (the same seeds, so the same
initialisations, teachers and noise). Example (docs/causal.md)::

    python experiments/mnist_dose.py \
        --run docs/results/stacked_m25/mnist_aux_compact.nc:aux \
        --run docs/results/causal_m25/mnist_aux_compact.nc:scale_update_0.5 \
        --run docs/results/dose_m25/mnist_aux_compact.nc --out docs/results/dose_m25
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import xarray as xr

from subliminal_mnist.dose import dose_markdown, plot_dose
from subliminal_mnist.pool import pool_runs

KEEP = ("teacher_accuracy", "reference_accuracy", "test_accuracy", "test_loss", "predicted_change")


def _run(text: str) -> tuple[Path, list[str] | None]:
    path, _, conditions = text.partition(":")
    return Path(path), conditions.split(",") if conditions else None


def main(argv: list[str] | None = None) -> str:
    """Write ``dose.md`` and ``dose.png`` into ``--out``; return the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--run", type=_run, action="append", required=True, metavar="FILE[:COND,...]",
        help="a compact results file and the conditions to take from it (repeat)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="folder for dose.md and dose.png")
    args = parser.parse_args(argv)
    ds = pool_runs([(xr.load_dataset(path), names) for path, names in args.run], KEEP)
    command = "python experiments/mnist_dose.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    text = "\n".join([
        f"Command: `{command}`",
        "",
        "Final test accuracy, final test loss, its change over the run (last evaluation minus "
        "first) and the first-order drive (sum over steps of "
        "g_t . Δθ; negative teaches the trait) against alpha, the fraction of each Adam update's "
        "component along g_t that is kept: mean ± 95% t interval over models, and the paired "
        "difference from `aux` model by model (`gradlens.stats.paired_t`, two-sided p).",
        "",
        dose_markdown(ds),
    ])  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dose.md").write_text(text)
    plot_dose(ds).savefig(args.out / "dose.png", dpi=120)
    return text


if __name__ == "__main__":
    main()
