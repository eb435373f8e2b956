"""Where the time of one benchmark case goes: a ``torch.profiler`` table.

Profiles cases of the registry (``model:batch:method``, step methods included;
a DDP method runs in a group of this one process) after a warm-up, and writes
one operator table per case, sorted by device time on CUDA and by CPU time
otherwise.

Example (from the repository root; ``python -m gradlens_bench.profile_case``
with ``benchmarks`` on the path takes the same arguments):
    python benchmarks/gradlens_bench/profile_case.py mlp:1024:pe_grads --out /tmp/prof
    python benchmarks/gradlens_bench/profile_case.py mnist_step:1024:step_probed --device cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: see "Running a file" in docs/benchmarks.md
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), str(_HERE.parents[1])] + [
        p for p in sys.path if Path(p).resolve() != _HERE
    ]

import torch
from torch.profiler import ProfilerActivity, profile

from gradlens_bench.measure import configure, sync
from gradlens_bench.methods import METHODS
from gradlens_bench.models import make_workload

__all__ = ["profile_table"]


def profile_table(spec: str, device: torch.device, repeats: int = 5, rows: int = 25) -> str:
    """Profile ``repeats`` calls of the case ``spec`` (``model:batch:method``) after 3 warm-ups.

    Returns:
        The profiler's operator table, headed by the case.
    """
    model, batch, method = spec.split(":", 2)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    family = METHODS[method].family
    with METHODS[method].prepare(make_workload(model, int(batch), device, family=family)) as run:
        for _ in range(3):
            run()
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                run()
            sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    return f"## {spec} ({repeats} calls, {device})\n\n```\n{table}\n```\n"


def main(argv: list[str] | None = None) -> None:
    """Profile each case named on the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="+", help="model:batch:method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write profiles.md here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    configure(device, args.threads)
    text = "".join(profile_table(c, device, args.repeats) for c in args.cases)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profiles.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
