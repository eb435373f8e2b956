"""Benchmark per-example gradient probes and the probed training step against their baselines.

For every model and batch size, each method of :data:`gradlens_bench.methods.METHODS`
that runs on the model is first checked (:mod:`gradlens_bench.agreement`), then
timed and its peak memory measured in a fresh process
(:mod:`gradlens_bench.measure`); the DDP methods of a DDP model are timed
together, one process per rank (:mod:`gradlens_bench.world`). Results go to
``results.nc``, ``table.md`` and ``probes.png`` under ``--out``.

Example (from the repository root; as a module, with ``benchmarks`` on the path,
``python -m gradlens_bench.run`` takes the same flags):
    python benchmarks/gradlens_bench/run.py --smoke --out /tmp/bench
    python benchmarks/gradlens_bench/run.py --device cpu --threads 1
    python benchmarks/gradlens_bench/run.py --device cpu --threads 1 --models zoo --batch-sizes 256
    python benchmarks/gradlens_bench/run.py --models ddp --batch-sizes 32 --threads 1 --out /tmp/ddp
    python benchmarks/gradlens_bench/run.py --render benchmarks/results/<slug>/results.nc
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: see "Running a file" in docs/benchmarks.md
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), str(_HERE.parents[1])] + [
        p for p in sys.path if Path(p).resolve() != _HERE
    ]

import torch
import xarray as xr
from tqdm import tqdm

from gradlens_bench.agreement import verify
from gradlens_bench.measure import Case, Protocol, configure, run_isolated
from gradlens_bench.methods import DEFAULT_METHODS, METHODS, quiet_hooks
from gradlens_bench.models import DDP, DEFAULT_MODELS, MODELS, REALISTIC, ZOO, make_workload
from gradlens_bench.realistic import SIZE_ENV, SIZES
from gradlens_bench.realistic import size as realistic_size
from gradlens_bench.render import render
from gradlens_bench.results import ROOT, build_dataset, device_slug, load_average, provenance
from gradlens_bench.world import measure_world

__all__ = ["BenchConfig", "main", "parse_args"]

_SPENT = "the run's time budget (--budget) was spent before this case started"

MATERIALISED_FACTOR = 2.5
"""Peak memory of a materialising method, in units of its ``example x parameter`` result."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: Output folder; ``None`` means ``benchmarks/results/<device-slug>``.
        models: Model names from :data:`gradlens_bench.models.MODELS`; by default
            all but the zoo (:data:`gradlens_bench.models.ZOO`) and the DDP models
            (:data:`gradlens_bench.models.DDP`).
        batch_sizes: Batch sizes, ascending.
        methods: Method names; every chosen method's baseline is added. By default
            all but the opt-in ones (the compiled steps), which are run when named.
        protocol: Timing protocol shared by every case (its device is overwritten).
        verify_batch: Examples used to check agreement, once per model.
        memory_limit_gb: Skip materialising cases whose estimated peak exceeds
            this; ``None`` means half the RAM (CPU) or 80% of the GPU memory.
        timeout_s: Longest a single case, or a DDP model's methods at one batch size, may take.
        world_size: Processes (ranks) of the DDP methods.
        budget_s: Seconds the whole run may take: once spent, every case not yet
            started is recorded as skipped, with the reason; ``None``: no limit.
        size: Size of the realistic models (:mod:`gradlens_bench.realistic`):
            one of :data:`gradlens_bench.realistic.SIZES`; ``None``: from the device.
    """

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: Path | None = None
    models: tuple[str, ...] = DEFAULT_MODELS
    batch_sizes: tuple[int, ...] = (64, 256, 1024, 4096)
    methods: tuple[str, ...] = DEFAULT_METHODS
    protocol: Protocol = field(default_factory=Protocol)
    verify_batch: int = 16
    memory_limit_gb: float | None = None
    timeout_s: float = 600.0
    world_size: int = 2
    budget_s: float | None = None
    size: str | None = None


def _memory_limit(config: BenchConfig, device: torch.device) -> float:
    if config.memory_limit_gb is not None:
        return config.memory_limit_gb * 2**30
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _skip_reason(method: str, batch: int, params: int, limit: float) -> str | None:
    spec = METHODS[method]
    if spec.max_batch is not None and batch > spec.max_batch:
        return f"timed only up to B={spec.max_batch}"
    need = MATERIALISED_FACTOR * batch * params * 4
    if spec.materialises and need > limit:
        return f"needs about {need / 2**30:.1f} GiB, over the {limit / 2**30:.1f} GiB limit"
    return None


def _methods(config: BenchConfig) -> list[str]:
    """The chosen methods with their baselines, in registry order."""
    chosen = set(config.methods) | {METHODS[m].baseline for m in config.methods}
    return [m for m in METHODS if m in chosen]


def _world(
    model: str, batch: int, methods: list[str], config: BenchConfig, protocol: Protocol
) -> dict[str, dict[str, object]]:
    """The DDP methods' records, all measured together over ``config.world_size`` processes."""
    if not methods:
        return {}
    load = load_average()
    found = measure_world(model, batch, methods, protocol, config.world_size, config.timeout_s)
    return {str(r["method"]): r | {"load_average": load} for r in found}


def _measure_model(
    model: str,
    methods: list[str],
    config: BenchConfig,
    protocol: Protocol,
    bar: tqdm,
    deadline: float,
) -> tuple[list[dict[str, object]], dict[tuple[str, str], dict[str, object]]]:
    """Check, then measure every case of one model: its records and agreement checks.

    Cases not started by ``deadline`` (``time.monotonic()``) are recorded as skipped.
    """
    device = torch.device(protocol.device)
    spec = MODELS[model]
    if time.monotonic() > deadline:
        bar.update(len(config.batch_sizes) * len(methods))
        return [
            {"model": model, "batch": b, "method": m, "status": "skipped", "note": _SPENT}
            for b in config.batch_sizes
            for m in methods
        ], {}
    mine = [m for m in methods if METHODS[m].family in spec.families]
    if "ddp" in spec.families and device.type != "cpu":
        note = "the DDP entry runs on CPU (gloo) only"
        bar.update(len(config.batch_sizes) * len(methods))
        return [
            {"model": model, "batch": b, "method": m}
            | ({"status": "skipped", "note": note} if m in mine else {"status": "not applicable"})
            for b in config.batch_sizes
            for m in methods
        ], {}
    bar.set_postfix_str(f"{model}: checking agreement")
    small = {f: make_workload(model, config.verify_batch, device, family=f) for f in spec.families}
    with quiet_hooks():
        checks = {m: verify(METHODS[m], small[METHODS[m].family]) for m in mine}
    params = sum(p.numel() for p in spec.build().parameters())
    limit = _memory_limit(config, device)
    records: list[dict[str, object]] = []
    for batch in config.batch_sizes:
        bar.set_postfix_str(f"{model} B={batch}")
        world = _world(
            model,
            batch,
            [m for m in mine if "ddp" in spec.families and checks[m].status == "ok"],
            config,
            protocol,
        )
        for method in methods:
            bar.set_postfix_str(f"{model} B={batch} {method}")
            record: dict[str, object] = {"model": model, "batch": batch, "method": method}
            if method not in mine:
                record |= {"status": "not applicable", "note": ""}
            elif checks[method].status != "ok":
                record |= {"status": checks[method].status, "note": checks[method].note}
            elif reason := _skip_reason(method, batch, params, limit):
                record |= {"status": "skipped", "note": reason}
            elif time.monotonic() > deadline:
                record |= {"status": "skipped", "note": _SPENT}
            elif method in world:
                record = world[method]
            else:
                load = load_average()
                left = min(config.timeout_s, max(deadline - time.monotonic(), 1.0))
                record = run_isolated(Case(model, batch, method), protocol, left)
                record["load_average"] = load
            records.append(record)
            bar.update()
    return records, {(model, m): asdict(a) for m, a in checks.items()}


def main(config: BenchConfig) -> xr.Dataset:
    """Check, then measure every case; write ``results.nc``, ``table.md`` and ``probes.png``.

    Returns:
        The results dataset (see :func:`gradlens_bench.results.build_dataset`).
    """
    deadline = time.monotonic() + (config.budget_s if config.budget_s is not None else 1e12)
    device = torch.device(config.device)
    if config.size is not None:  # before the forkserver starts: every case inherits it
        os.environ[SIZE_ENV] = config.size
    protocol = Protocol(**{**asdict(config.protocol), "device": str(device)})
    threads = torch.get_num_threads()
    configure(device, protocol.threads)
    methods = _methods(config)
    limit = _memory_limit(config, device)
    records: list[dict[str, object]] = []
    agreements: dict[tuple[str, str], dict[str, object]] = {}
    attrs = provenance(device, config)  # records the thread count of the run
    out = config.out or ROOT / "benchmarks" / "results" / device_slug(device)
    total = len(config.models) * len(config.batch_sizes) * len(methods)
    with tqdm(total=total, desc="cases", unit="case") as bar:
        for model in config.models:
            found, checks = _measure_model(model, methods, config, protocol, bar, deadline)
            records += found
            agreements |= checks
    torch.set_num_threads(threads)
    attrs |= {
        "peak_memory_measure": "cuda_max_memory_allocated"
        if device.type == "cuda"
        else "torch_profiler_memory_events",
        "peak_rss_measure": next(
            (str(r["rss_measure"]) for r in records if "rss_measure" in r), ""
        ),
        "memory_limit_bytes": int(limit),
        "budget_s": config.budget_s if config.budget_s is not None else float("nan"),
    }
    if set(config.models) & set(REALISTIC):
        attrs |= {"realistic_size": realistic_size()}
    if set(config.models) & set(DDP):
        attrs |= {"ddp_world_size": config.world_size, "ddp_steps": protocol.steps}
        attrs |= {"ddp_blocks": protocol.blocks, "ddp_threads": protocol.threads or 1}
    ds = build_dataset(
        records,
        agreements,
        models=list(config.models),
        batches=list(config.batch_sizes),
        methods=methods,
        attrs=attrs,
    )
    out.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(out / "results.nc")
    print(render(out / "results.nc"))
    return ds


def _csv(
    kind: type, choices: list[str] | None = None, groups: dict[str, tuple[str, ...]] | None = None
) -> object:
    def parse(text: str) -> tuple:
        items = tuple(kind(t) for t in text.split(",") if t)
        items = tuple(i for t in items for i in (groups or {}).get(t, (t,)))
        bad = [i for i in items if choices is not None and i not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {choices}")
        return items

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=BenchConfig.device)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument(
        "--models",
        type=_csv(
            str,
            list(MODELS),
            {"zoo": ZOO, "ddp": DDP, "realistic": REALISTIC, "all": tuple(MODELS)},
        ),
        default=DEFAULT_MODELS,
        help=f"comma-separated, or 'zoo' ({','.join(ZOO)}), 'ddp' ({','.join(DDP)}), "
        f"'realistic' ({','.join(REALISTIC)}) or 'all'; "
        "default all but the zoo, the DDP and the realistic models",
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default=None,
        help="size of the realistic models (default: gpu on CUDA, else cpu)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds the whole run may take; cases not started by then are recorded as skipped",
    )
    p.add_argument("--batch-sizes", type=_csv(int), default=None)
    p.add_argument(
        "--methods",
        type=_csv(str, list(METHODS)),
        default=DEFAULT_METHODS,
        help="comma-separated; default all but the compiled steps (name them to run them)",
    )
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<device>/")
    p.add_argument("--smoke", action="store_true", help="B=16, few calls: checks that all runs")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS",
        help="only redraw: a results.nc, or the overhead.json of the first DDP benchmark",
    )
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per case")
    p.add_argument("--max-time", type=float, default=None, help="most seconds of timed calls")
    p.add_argument("--verify-batch", type=int, default=None, help="examples of the agreement check")
    p.add_argument("--memory-limit-gb", type=float, default=None)
    p.add_argument("--timeout", type=float, default=BenchConfig.timeout_s, help="seconds per case")
    p.add_argument("--world-size", type=int, default=BenchConfig.world_size, help="DDP ranks")
    p.add_argument("--ddp-steps", type=int, default=None, help="DDP steps per timed block")
    p.add_argument("--ddp-blocks", type=int, default=None, help="DDP timed blocks per method")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path | None]:
    """Map command-line flags onto a :class:`BenchConfig`, and the ``--render`` path if given."""
    args = _parser().parse_args(argv)
    smoke = Protocol(min_time_s=0.0, max_time_s=0.2, threads=1, steps=1, blocks=2)
    protocol = smoke if args.smoke else Protocol()
    changes = {
        "threads": args.threads,
        "min_time_s": args.min_time,
        "max_time_s": args.max_time,
        "steps": args.ddp_steps,
        "blocks": args.ddp_blocks,
    }
    protocol = Protocol(
        **{**asdict(protocol), **{k: v for k, v in changes.items() if v is not None}}
    )
    config = BenchConfig(
        device=args.device,
        out=args.out,
        models=args.models,
        batch_sizes=args.batch_sizes or ((16,) if args.smoke else BenchConfig.batch_sizes),
        methods=args.methods,
        protocol=protocol,
        verify_batch=args.verify_batch or (4 if args.smoke else BenchConfig.verify_batch),
        memory_limit_gb=args.memory_limit_gb,
        timeout_s=args.timeout,
        world_size=args.world_size,
        budget_s=args.budget,
        size=args.size,
    )
    return config, args.render


if __name__ == "__main__":
    config, results = parse_args()
    if results is not None:
        print(render(results))
    else:
        main(config)
