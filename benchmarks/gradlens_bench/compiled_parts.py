"""Which compiled part of a probed step pays: eager, all parts compiled, the forms left eager.

One process, one thread, process CPU time per step (the least of ``--repeats``
blocks of ``--steps`` steps, after 3 warm-up steps that compile), interleaved so
that the machine's load hits every variant alike: the unprobed step, the probed
step eager, with ``compile=True`` (every part, :mod:`gradlens.compiling`), and
with ``Compile(parts=("vmap", "records"))`` (the factored forms eager).

Example (from the repository root):
    python benchmarks/gradlens_bench/compiled_parts.py --out /tmp/parts.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: see "Running a file" in docs/benchmarks.md
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), str(_HERE.parents[1])] + [
        p for p in sys.path if Path(p).resolve() != _HERE
    ]

import torch

from gradlens.compiling import Compile
from gradlens_bench import step
from gradlens_bench.models import make_workload
from gradlens_bench.results import device_slug

__all__ = ["VARIANTS", "measure"]

VARIANTS: dict[str, bool | Compile] = {
    "eager": False,
    "compiled": True,
    "compiled, forms eager": Compile(parts=("vmap", "records")),
}


def _cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def _per_step(run: Callable[[], object], steps: int) -> float:
    start = _cpu_s()
    for _ in range(steps):
        run()
    return (_cpu_s() - start) / steps


def measure(model: str, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Seconds of process CPU time per step of each variant, and of the unprobed step."""
    w = make_workload(model, batch, torch.device("cpu"), family="step")
    runs: dict[str, Callable[[], object]] = {"unprobed": lambda: step.unprobed(w)}
    for name, option in VARIANTS.items():
        runs[name] = lambda option=option: step.probed(w, compile=option)
    for run in runs.values():  # warm-up: compiles
        for _ in range(3):
            run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], _per_step(run, steps))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn:64,mnist_step:256,encoder:64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    found = []
    for item in args.models.split(","):
        model, batch = item.split(":")
        times = measure(model, int(batch), args.steps, args.repeats)
        found.append({"model": model, "batch": int(batch), "cpu_s_per_step": times})
        base = times["unprobed"]
        cells = " | ".join(f"{name} {t / base:.2f}x" for name, t in times.items())
        print(f"| {model} | {batch} | {base * 1e3:.1f} ms | {cells} |", flush=True)
    record = {
        "device": device_slug(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": 1,
        "steps": args.steps,
        "repeats": args.repeats,
        "command": " ".join(sys.argv),
        "results": found,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
