"""Benchmark per-example gradient probes against the plain backward pass.

For every model and batch size, each method is first checked against a
per-example autograd loop, then timed and its peak memory measured in a fresh
process (see :mod:`benchmarks.measure`). Results go to ``results.nc`` (xarray,
netCDF), ``table.md`` (ratios to the plain backward of the same run) and
``probes.png`` under ``--out``.

Example:
    python -m benchmarks.bench_probes --smoke --out /tmp/bench
    python -m benchmarks.bench_probes --device cpu --threads 1
    python -m benchmarks.bench_probes --render benchmarks/results/<slug>/results.nc
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xarray as xr
from tqdm import tqdm

from benchmarks.cases import METHODS, Options, missing_requirement, quiet_hooks
from benchmarks.measure import Case, Protocol, run_isolated
from benchmarks.models import MODELS, make_workload, n_params
from benchmarks.report import (
    ROOT,
    add_ratios,
    build_dataset,
    device_slug,
    load_average,
    markdown,
    plot,
    provenance,
)
from benchmarks.targets import targets_markdown
from benchmarks.verify import Agreement, verify_methods

__all__ = ["BenchConfig", "main"]

MATERIALISED_FACTOR = 2.5
"""Peak memory of a materialising method, in units of its ``example x parameter`` result."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: Output folder; ``None`` means ``benchmarks/results/<device-slug>``.
        models: Model names from :data:`benchmarks.models.MODELS`.
        batch_sizes: Batch sizes, ascending.
        methods: Method names from :data:`benchmarks.cases.METHODS`; the plain
            backward is always added, first.
        protocol: Timing protocol shared by every case (its device is overwritten).
        verify_batch: Examples used to check agreement, once per model.
        memory_limit_gb: Skip materialising cases whose estimated peak exceeds
            this; ``None`` means half the RAM (CPU) or 80% of the GPU memory.
        timeout_s: Longest a single case may take.
    """

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: Path | None = None
    models: tuple[str, ...] = tuple(MODELS)
    batch_sizes: tuple[int, ...] = (64, 256, 1024, 4096)
    methods: tuple[str, ...] = tuple(METHODS)
    protocol: Protocol = field(default_factory=Protocol)
    verify_batch: int = 16
    memory_limit_gb: float | None = None
    timeout_s: float = 600.0


SMOKE = {
    "batch_sizes": (16,),
    "protocol": Protocol(warmup=1, min_repeats=3, max_repeats=3, min_time_s=0.0, threads=1),
    "verify_batch": 4,
}


def _memory_limit(config: BenchConfig, device: torch.device) -> float:
    if config.memory_limit_gb is not None:
        return config.memory_limit_gb * 2**30
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory
    try:
        import os

        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _skip_reason(method: str, batch: int, params: int, limit: float) -> str | None:
    spec = METHODS[method]
    if spec.max_batch is not None and batch > spec.max_batch:
        return f"timed only up to B={spec.max_batch}"
    need = MATERIALISED_FACTOR * batch * params * 4
    if spec.materialises and need > limit:
        return f"needs about {need / 2**30:.1f} GiB, over the {limit / 2**30:.1f} GiB limit"
    return None


def main(config: BenchConfig) -> xr.Dataset:
    """Run the benchmark and write ``results.nc``, ``table.md`` and ``probes.png``.

    Returns:
        The results dataset (see :func:`benchmarks.report.build_dataset`).
    """
    with _torch_threads(config.protocol.threads):
        return _run(config)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block, then restore the caller's setting."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(config: BenchConfig) -> xr.Dataset:
    device = torch.device(config.device)
    protocol = dataclasses.replace(config.protocol, device=str(device))
    methods = ["plain", *(m for m in config.methods if m != "plain")]
    for m in methods:
        note = missing_requirement(METHODS[m])
        if note is not None:
            print(f"note: skipping {m}: {note}", file=sys.stderr)
    out = config.out or ROOT / "benchmarks" / "results" / device_slug(device)
    limit = _memory_limit(config, device)
    options = Options(chunk_size=protocol.chunk_size)
    records: list[dict[str, object]] = []
    agreements: dict[str, dict[str, object]] = {}
    total = len(config.models) * len(config.batch_sizes) * len(methods)
    with tqdm(total=total, desc="cases", unit="case") as bar:
        for model in config.models:
            bar.set_postfix_str(f"{model}: checking agreement")
            with quiet_hooks():
                checks = verify_methods(
                    make_workload(model, config.verify_batch, device), methods, options
                )
            agreements.update({f"{model}/{m}": dataclasses.asdict(a) for m, a in checks.items()})
            params = n_params(MODELS[model].build())
            for batch in config.batch_sizes:
                for method in methods:
                    bar.set_postfix_str(f"{model} B={batch} {method}")
                    record = _measure(
                        model,
                        batch,
                        method,
                        checks[method],
                        params,
                        limit,
                        protocol,
                        config.timeout_s,
                    )
                    records.append(record)
                    bar.update()
    rss_measure = next((str(r["rss_measure"]) for r in records if "rss_measure" in r), "")
    attrs = provenance(device, config)
    attrs["peak_memory_measure"] = (
        "cuda_max_memory_allocated" if device.type == "cuda" else "torch_profiler_memory_events"
    )
    attrs["peak_rss_measure"] = rss_measure
    attrs["memory_limit_bytes"] = int(limit)
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
    render(out / "results.nc")
    return ds


def render(results: Path) -> None:
    """Write ``table.md`` and ``probes.png`` next to a ``results.nc``, and print the table.

    Also run on its own (``--render``) to redraw the outputs of an earlier run
    without measuring again.
    """
    with xr.open_dataset(results) as stored:
        ds = add_ratios(stored.load())
    table = markdown(ds) + "\n" + targets_markdown(ds)
    (results.parent / "table.md").write_text(table)
    plot(ds, results.parent / "probes.png")
    print(table)
    print(f"wrote {results}, {results.parent / 'table.md'}, {results.parent / 'probes.png'}")


def _measure(
    model: str,
    batch: int,
    method: str,
    check: Agreement,
    params: int,
    limit: float,
    protocol: Protocol,
    timeout_s: float,
) -> dict[str, object]:
    case = {"model": model, "batch": batch, "method": method}
    if check.status != "ok":
        return {**case, "status": check.status, "note": check.note}
    reason = _skip_reason(method, batch, params, limit)
    if reason is not None:
        return {**case, "status": "skipped", "note": reason}
    load = load_average()
    return {**run_isolated(Case(model, batch, method), protocol, timeout_s), "load_average": load}


def _csv(kind: type, choices: list[str] | None = None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = tuple(kind(t) for t in text.split(",") if t)
        bad = [i for i in items if choices is not None and i not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {choices}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """Map command-line flags onto a :class:`BenchConfig`."""
    default = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=default.device)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results/<device-slug>/)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny grid, few repeats: checks that everything runs"
    )
    p.add_argument("--models", type=_csv(str, list(MODELS)), default=None)
    p.add_argument("--batch-sizes", type=_csv(int), default=None)
    p.add_argument("--methods", type=_csv(str, list(METHODS)), default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--min-repeats", type=int, default=None)
    p.add_argument("--max-repeats", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per case")
    p.add_argument("--max-time", type=float, default=None, help="cap on them for slow calls")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--memory-limit-gb", type=float, default=None)
    p.add_argument("--timeout", type=float, default=default.timeout_s)
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS_NC",
        help="only redraw table.md and probes.png from an existing results.nc",
    )
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else {}
    protocol = base.get("protocol", default.protocol)
    overrides = {
        "warmup": args.warmup,
        "min_repeats": args.min_repeats,
        "max_repeats": args.max_repeats,
        "min_time_s": args.min_time,
        "max_time_s": args.max_time,
        "chunk_size": args.chunk_size,
        "threads": args.threads,
    }
    protocol = dataclasses.replace(
        protocol, **{k: v for k, v in overrides.items() if v is not None}
    )
    return BenchConfig(
        device=args.device,
        out=args.out,
        models=args.models or default.models,
        batch_sizes=args.batch_sizes or base.get("batch_sizes", default.batch_sizes),
        methods=args.methods or default.methods,
        protocol=protocol,
        verify_batch=base.get("verify_batch", default.verify_batch),
        memory_limit_gb=args.memory_limit_gb,
        timeout_s=args.timeout,
    )


if __name__ == "__main__":
    if "--render" in sys.argv:
        render(Path(sys.argv[sys.argv.index("--render") + 1]))
    else:
        main(parse_args())
