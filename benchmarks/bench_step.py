"""Case (g): one full probed student step of the MNIST experiment against an unprobed step.

The unprobed step is what a plain distillation loop does: the teacher's
auxiliary logits on the noise batch, the student's forward and backward of the
KL, and an Adam step. The probed step adds everything ``probed_step`` records:
the trait gradient on a 1024-image probe batch, the ghost per-example cosines,
the alignment metrics, the update's alignment and (optionally) the measured
trait-loss change. Both steps start from identical states and are first checked
to apply the same update.

    python -m benchmarks.bench_step                  # CPU or GPU, batches 256..4096
    python -m benchmarks.bench_step --smoke          # seconds; exercised by the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.measure import allocator_peak, sync
from benchmarks.report import device_name, device_slug, provenance
from gradlens import Objective, flush_denormal, probed_step, remove_aligned
from gradlens.mnist import class_cross_entropy, init_mlp, logit_kl, noise_batch

SIZES = (784, 256, 256, 13)


@dataclass(frozen=True)
class StepConfig:
    """What to measure."""

    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batch_sizes: tuple[int, ...] = (256, 1024, 4096)
    probe_size: int = 1024
    repeats: int = 30
    warmup: int = 3
    threads: int | None = None
    out: Path | None = None


def _state(device: torch.device, batch: int, probe: int) -> dict[str, object]:
    """Teacher, student, optimizer, one noise batch and a labelled probe batch."""
    gen = torch.Generator().manual_seed(1)
    teacher = init_mlp(SIZES, seed=0).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():  # a teacher that differs from the student
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    teacher = teacher.to(device)
    student = init_mlp(SIZES, seed=0).to(device)
    return {
        "teacher": teacher,
        "student": student,
        "optimizer": torch.optim.Adam(student.parameters(), lr=3e-4),
        "noise": noise_batch(0, 0, 0, batch, device=str(device)),
        "probe": (torch.rand(probe, 784, generator=gen) * 2 - 1).to(device),
        "labels": torch.randint(0, 10, (probe,), generator=gen).to(device),
    }


def _steps(s: dict[str, object]) -> dict[str, Callable[[], object]]:
    """The step variants over one shared state (each call advances it)."""
    teacher, student, opt = s["teacher"], s["student"], s["optimizer"]
    distill, trait_loss = logit_kl(10), class_cross_entropy(10)
    trait = Objective(trait_loss, s["probe"], (s["labels"],))
    tx = remove_aligned()
    tx_state = tx.init(dict(student.named_parameters()))

    def unprobed() -> None:
        with torch.no_grad():
            target = teacher(s["noise"])[:, 10:]
        opt.zero_grad(set_to_none=True)
        distill(student(s["noise"]), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def probed(measure_change: bool = True, before: object = None) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                target = teacher(s["noise"])[:, 10:]
            train = Objective(distill, s["noise"], (target,))
            state = tx_state if before is not None else None
            return probed_step(
                student,
                opt,
                train,
                trait,
                before=before,
                before_state=state,
                measure_change=measure_change,
            )

        return run

    return {
        "unprobed step": unprobed,
        "probed step": probed(),
        "probed step, no measured change": probed(measure_change=False),
        "probed step + remove_aligned": probed(before=tx),
    }


def check_same_update(device: torch.device, batch: int, probe: int) -> float:
    """Largest relative difference between the updates of an unprobed and a probed step."""
    a, b = _state(device, batch, probe), _state(device, batch, probe)
    before = [p.detach().clone() for p in a["student"].parameters()]
    _steps(a)["unprobed step"]()
    _steps(b)["probed step"]()
    worst = 0.0
    for p0, pa, pb in zip(
        before, a["student"].parameters(), b["student"].parameters(), strict=True
    ):
        da, db = pa.detach() - p0, pb.detach() - p0
        worst = max(worst, float((da - db).norm() / da.norm().clamp_min(1e-30)))
    return worst


def measure(config: StepConfig) -> dict[str, object]:
    """Time and peak memory of each step variant at each batch size."""
    device = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    rows = []
    with flush_denormal():
        for batch in config.batch_sizes:
            agreement = check_same_update(device, batch, config.probe_size)
            if agreement > 1e-4:
                raise AssertionError(f"probed and unprobed updates differ by {agreement:.2e}")
            state = _state(device, batch, config.probe_size)
            for name, run in _steps(state).items():
                for _ in range(config.warmup):
                    run()
                times, cpu_times = [], []
                for _ in range(config.repeats):
                    sync(device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    run()
                    sync(device)
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - start_cpu)
                q = statistics.quantiles(times, n=4)
                rows.append(
                    {
                        "batch": batch,
                        "step": name,
                        "median_s": statistics.median(times),
                        "iqr_s": q[2] - q[0],
                        "median_cpu_s": statistics.median(cpu_times),
                        "peak_bytes": allocator_peak(run, device),
                        "update_agreement": agreement,
                    }
                )
    return {
        "rows": rows,
        "config": {**asdict(config), "out": str(config.out)},
        "device": device_name(device),
        "attrs": provenance(device, config),
    }


def markdown(result: dict[str, object]) -> str:
    """A table of each variant's time and peak memory as a ratio to the unprobed step.

    On a CPU the ratio is of process CPU time (steadier on a shared machine;
    wall-clock medians are in the JSON file); on a GPU, of wall-clock time.
    """
    rows = result["rows"]
    key = "median_cpu_s" if result["config"]["device"] == "cpu" else "median_s"
    clock = "process CPU time" if key == "median_cpu_s" else "wall-clock time"
    batches = sorted({r["batch"] for r in rows})
    names = list(dict.fromkeys(r["step"] for r in rows))
    base = {r["batch"]: r for r in rows if r["step"] == "unprobed step"}
    lines = [
        f"Device: {result['device']}; commit `{result['attrs']['git_commit'][:10]}`; "
        f"{clock}, median of {result['config']['repeats']} steps.",
        "",
        "| step | " + " | ".join(f"B={b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name in names:
        cells = []
        for b in batches:
            r = next(r for r in rows if r["batch"] == b and r["step"] == name)
            if name == "unprobed step":
                cells.append(f"{r[key] * 1e3:.2f} ms, {r['peak_bytes'] / 2**20:.1f} MiB")
            else:
                t = r[key] / base[b][key]
                m = r["peak_bytes"] / max(base[b]["peak_bytes"], 1)
                cells.append(f"{t:.2f}x time, {m:.2f}x memory")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(config: StepConfig) -> Path:
    """Measure, then write ``step.json`` and ``step.md``; returns the folder."""
    result = measure(config)
    out = config.out or Path("benchmarks/results") / device_slug(torch.device(config.device))
    out.mkdir(parents=True, exist_ok=True)
    (out / "step.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "step.md").write_text(markdown(result))
    print(markdown(result))
    return out


def parse(argv: list[str] | None = None) -> StepConfig:
    """Map flags onto a :class:`StepConfig`."""
    parser = argparse.ArgumentParser(description="Case (g): probed vs unprobed student step.")
    parser.add_argument("--device")
    parser.add_argument("--batch-sizes", type=lambda t: tuple(int(x) for x in t.split(",")))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast")
    args = parser.parse_args(argv)
    config = StepConfig()
    if args.smoke:
        config = StepConfig(batch_sizes=(64,), probe_size=64, repeats=3, warmup=1, device="cpu")
    changes = {k: v for k, v in vars(args).items() if k != "smoke" and v is not None}
    return StepConfig(**{**asdict(config), **changes})


if __name__ == "__main__":
    main(parse())
