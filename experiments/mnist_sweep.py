r"""Put finished MNIST runs that differ in one setting side by side: a table, a figure, a file.

Each ``--run VALUE=FOLDER`` is the ``--out`` folder of one ``mnist_aux.py`` run
(its ``mnist_aux_compact.nc``, else ``mnist_aux.nc``, and its ``summary.md``
for the command). Examples (docs/experiment.md)::

    python experiments/mnist_sweep.py --dim lambda0 --conditions aux liminal \\
        --run 0=runs/lam0 --run 1=runs/m10lim --run 4=runs/lam4 --shared runs/m10lim \\
        --out docs/results/liminal_lambda0
    python experiments/mnist_sweep.py --dim probe_size --log --conditions aux remove \\
        --run 256=runs/probe256 --run 60000=runs/probe60000 --out docs/results/probe_size
    python experiments/mnist_sweep.py --dim sgd_lr --log --conditions aux sgd \\
        --run 1=runs/sgd_lr/lr1 --run 3=runs/sgd_lr/lr3 --shared runs/sgd_lr/aux \\
        --match distill_loss --out docs/results/sgd_lr_sgd

writes ``sweep.nc`` (the final values, dims ``(dim, condition, model)``),
``summary.md`` and ``sweep.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import xarray as xr

from subliminal_mnist.compact import COMPACT
from subliminal_mnist.sweep import (
    SWEEP_FILE,
    matched_value,
    plot_sweep,
    sweep_finals,
    sweep_markdown,
)

LABELS = {
    "lambda0": "liminal lambda_0 (weight at step 0)",
    "probe_size": "trait probe images",
    "sgd_lr": "SGD learning rate",
}


def _run_file(folder: Path) -> Path:
    for name in (COMPACT, "mnist_aux.nc"):
        if (folder / name).exists():
            return folder / name
    raise SystemExit(f"mnist_sweep.py: error: {folder} holds no {COMPACT} or mnist_aux.nc")


def _command(folder: Path) -> str:
    summary = folder / "summary.md"
    if summary.exists():
        for line in summary.read_text().splitlines():
            if line.startswith("Command: `"):
                return line.split("`")[1]
    return f"(the run in {folder})"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dim", required=True, help="the swept setting: lambda0, probe_size, ...")
    parser.add_argument("--conditions", nargs=2, required=True, metavar=("BASELINE", "COMPARED"))
    parser.add_argument("--run", action="append", required=True, metavar="VALUE=FOLDER")
    parser.add_argument("--shared", type=Path, help="a run holding conditions the others lack")
    parser.add_argument("--log", action="store_true", help="log scale for the swept setting")
    parser.add_argument(
        "--match",
        metavar="VARIABLE",
        help="also name the value at which COMPARED's mean final VARIABLE (distill_loss) is "
        "nearest BASELINE's, on a log scale: the SGD learning rate matched to aux",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for item in args.run:
        if "=" not in item:
            parser.error(f"--run takes VALUE=FOLDER, got {item!r}")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Write the sweep's file, table and figure; returns the folder."""
    args = _parse(argv)
    folders = {float(v): Path(f) for v, f in (item.split("=", 1) for item in args.run)}
    shared = xr.load_dataset(_run_file(args.shared)) if args.shared else None
    runs = {v: xr.load_dataset(_run_file(f)) for v, f in folders.items()}
    finals = sweep_finals(
        runs,
        dim=args.dim,
        conditions=args.conditions,
        commands={v: _command(f) for v, f in folders.items()},
        shared=shared,
    )
    if args.shared:
        lacking = [
            c
            for c in args.conditions
            if any(c not in run.condition.values for run in runs.values())
        ]
        finals.attrs["shared"] = (
            f"{', '.join(f'`{c}`' for c in lacking)} where a run lacks it: "
            f"`{_command(args.shared)}`"
        )
    finals.attrs["sweep_command"] = shlex.join(
        ["python", "experiments/mnist_sweep.py", *(sys.argv[1:] if argv is None else argv)]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.match:  # sweep_markdown adds the section; the attr keeps it recomputable
        finals.attrs["match"] = args.match
        finals.attrs["matched"] = matched_value(finals, dim=args.dim, variable=args.match)
    finals.to_netcdf(args.out / SWEEP_FILE)
    (args.out / "summary.md").write_text(sweep_markdown(finals, dim=args.dim))
    label = LABELS.get(args.dim, args.dim)
    plot_sweep(finals, dim=args.dim, xlabel=label, log=args.log).savefig(
        args.out / "sweep.png", dpi=120
    )
    print(f"wrote {args.out / SWEEP_FILE}, summary.md and sweep.png", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
