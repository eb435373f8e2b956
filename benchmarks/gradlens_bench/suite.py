"""Every GPU number of issue 21 in one call: realistic models, the tiny models, 100 MNIST models.

Runs its parts one after another, each a fresh process with a time budget, and
writes everything under one folder named after the device
(``docs/results/gpu/<device-slug>/`` on CUDA): per part a folder with the
harness's ``results.nc``, ``table.md`` and ``probes.png`` (or the MNIST run's
timing), its log, and for the whole suite ``suite.json`` (each part's command,
budget, wall time, exit status and outcome), ``suite.md`` (the tables) and
``suite.png`` (the figure). A part that overruns is stopped; a part with no time
left is skipped; both are recorded, so the suite ends inside ``--budget``.

The parts (in order; ``--parts`` picks some):

- ``env``: versions, the device, and the imports every part needs.
- ``realistic_lm``: the Llama-style LM (about 134M parameters, 1024 tokens),
  fully fine-tuned and with LoRA, B=8.
- ``mnist``: ``experiments/mnist_aux.py --models 100`` over every condition,
  probed every step; its wall time (teachers, students, evaluation, writing).
- ``realistic_long``: the same Llama at 4096 tokens, B=2 (GhostSuite's setting).
- ``realistic_other``: padded BERT, ViT-S/16, mobilenet_v3_small, B=32.
- ``zoo``: the tiny models (the experiment's MLP and student step, the zoo) at B=1024.
- ``compiled``: the probed step with gradlens's own arithmetic compiled
  (``probed_step(compile=...)``), without and with CUDA graphs, beside the eager
  probed and the unprobed step: the experiment's student step at B=1024.

Each realistic part times the unprobed step, the unprobed step plus the trait
gradient, and the probed step, in one run (ratios to the unprobed step of the
same run).

Example (from the repository root):
    python benchmarks/gradlens_bench/suite.py --dry-run            # print the plan
    python benchmarks/gradlens_bench/suite.py --device cpu --tiny  # everything, small, on CPU
    python benchmarks/gradlens_bench/suite.py --archive /tmp/suite.tar.gz   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: see "Running a file" in docs/benchmarks.md
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [
        str(_HERE.parent),
        str(_HERE.parents[1]),
        str(_HERE.parents[1] / "experiments"),
    ] + [p for p in sys.path if Path(p).resolve() != _HERE]

__all__ = ["Part", "SuiteConfig", "env_check", "main", "parse_args", "part_budget", "plan"]

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "gradlens_bench" / "run.py"
MNIST = ROOT / "experiments" / "mnist_aux.py"
STEP_METHODS = "step_unprobed,step_plain_trait,step_probed,step_probed_reused"
ZOO_METHODS = f"plain,dots_auto,dots_ghost,{STEP_METHODS}"
COMPILED_METHODS = "step_unprobed,step_probed,step_probed_compiled,step_probed_cuda_graphs"
MIN_PART_S = 5.0
"""A part with fewer seconds than this is skipped, not started."""
GRACE_S = 30.0
"""Seconds a part may run past its budget (a case in flight, the writing) before it is stopped."""


@dataclass(frozen=True)
class Part:
    """One step of the suite: a command and its share of the time budget.

    Attributes:
        name: Folder and key of the part.
        command: The argument vector (``{budget}`` is replaced by the part's seconds).
        share: Fraction of the suite's budget planned for the part; time a part
            leaves unused passes to the next.
        results: Whether the part writes a harness ``results.nc`` into its folder.
    """

    name: str
    command: tuple[str, ...]
    share: float
    results: bool = True


@dataclass(frozen=True)
class SuiteConfig:
    """What to run: the device, small (``tiny``) or headline sizes, the budget, where to write."""

    device: str = "cuda"
    tiny: bool = False
    budget_s: float = 420.0
    out: Path | None = None
    data_dir: str | None = None
    parts: tuple[str, ...] = field(default_factory=tuple)
    archive: Path | None = None


def _harness(
    name: str, models: str, batch: str, methods: str, size: str, c: SuiteConfig, out: Path
) -> tuple[str, ...]:
    timing = ("--smoke",) if c.tiny else ("--min-time", "0.5", "--max-time", "2")
    return (
        sys.executable,
        str(RUN),
        "--device",
        c.device,
        "--models",
        models,
        "--batch-sizes",
        batch,
        "--methods",
        methods,
        "--size",
        "tiny" if c.tiny else size,
        "--verify-batch",
        "2" if name.startswith("realistic") else "16",
        "--budget",
        "{budget}",
        "--out",
        str(out / name),
        *timing,
        *(("--threads", "1") if c.device == "cpu" else ()),
    )


def _data_dir(c: SuiteConfig) -> str:
    """The MNIST folder: ``--data-dir``, ``$GRADLENS_DATA_DIR``, else ``[../]shared/data``."""
    found = c.data_dir or os.environ.get("GRADLENS_DATA_DIR")
    if found:
        return found
    for candidate in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if candidate.is_dir():
            return str(candidate)
    return str(ROOT / "shared" / "data")


def _mnist_command(conditions: list[str], c: SuiteConfig, out: Path) -> tuple[str, ...]:
    """The MNIST run: 100 models (2 when tiny) over ``conditions``, probed every step."""
    return (
        sys.executable,
        str(MNIST),
        "--models",
        "2" if c.tiny else "100",
        "--conditions",
        *conditions,
        "--device",
        c.device,
        "--data-dir",
        _data_dir(c),
        "--out",
        str(out / "mnist" / "run"),
        "--no-progress",
        "--overwrite",
        *(("--quick",) if c.tiny else ()),
    )


def plan(c: SuiteConfig, out: Path) -> list[Part]:
    """The suite's parts for ``c``, writing under ``out``.

    Where the MNIST package does not import here (a torch that gradlens does not
    run on), the MNIST part is that import, so its log holds the error.
    """
    env = (sys.executable, str(Path(__file__).resolve()), "--env-check", "--device", c.device)
    try:
        from subliminal_mnist import CONDITIONS
    except Exception:
        mnist: tuple[str, ...] = (sys.executable, "-c", "import subliminal_mnist")
    else:
        mnist = _mnist_command(sorted(CONDITIONS), c, out)
    tiny = c.tiny
    parts = [
        Part("env", env, 0.06, results=False),
        Part(
            "realistic_lm",
            _harness("realistic_lm", "llama,llama_lora", "8", STEP_METHODS, "gpu", c, out),
            0.25,
        ),
        Part("mnist", mnist, 0.25, results=False),
        Part(
            "realistic_long",
            _harness("realistic_long", "llama", "2", STEP_METHODS, "gpu_long", c, out),
            0.15,
        ),
        Part(
            "realistic_other",
            _harness(
                "realistic_other",
                "bert_padded,vit,mobilenet",
                "8" if tiny else "32",
                STEP_METHODS,
                "gpu",
                c,
                out,
            ),
            0.12,
        ),
        Part(
            "zoo",
            _harness(
                "zoo",
                "mlp,mnist_step,gpt2_tiny,small_cnn,encoder,resnet",
                "16" if tiny else "1024",
                ZOO_METHODS,
                "gpu",
                c,
                out,
            ),
            0.11,
        ),
        Part(
            "compiled",
            _harness(
                "compiled",
                "mnist_step",
                "16" if tiny else "1024",
                COMPILED_METHODS,
                "gpu",
                c,
                out,
            ),
            0.06,
        ),
    ]
    return [p for p in parts if not c.parts or p.name in c.parts]


def env_check(device: str) -> None:
    """Print the versions and the device, importing what every part needs (fails if one is not)."""
    import netCDF4
    import peft
    import torch
    import torchvision
    import transformers
    import xarray

    import gradlens

    print(sys.version)
    for module in (torch, torchvision, transformers, peft, xarray, netCDF4, gradlens):
        print(module.__name__, module.__version__)
    found = torch.device(device)
    name = torch.cuda.get_device_name(found) if found.type == "cuda" else "cpu"
    print("device", found, name)
    torch.ones(2, device=found).sum().item()  # the device answers


def _environment() -> dict[str, str]:
    """The parts' environment: the repository, its experiments and benchmarks importable."""
    paths = [str(ROOT), str(ROOT / "experiments"), str(ROOT / "benchmarks")]
    extra = os.environ.get("PYTHONPATH")
    return os.environ | {
        "PYTHONPATH": os.pathsep.join(paths + ([extra] if extra else [])),
        "PYTHONUNBUFFERED": "1",
    }


def _run_part(part: Part, budget: float, out: Path) -> dict[str, object]:
    """Run one part with ``budget`` seconds (plus :data:`GRACE_S`); its record for suite.json."""
    command = [a.replace("{budget}", f"{budget:.0f}") for a in part.command]
    log = out / f"{part.name}.log"
    start = time.monotonic()
    record: dict[str, object] = {
        "part": part.name,
        "command": shlex.join(command),
        "budget_s": round(budget, 1),
    }
    print(f"== {part.name} (budget {budget:.0f} s): {record['command']}", flush=True)
    with log.open("w") as sink:
        try:
            done = subprocess.run(
                command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=_environment(),
                cwd=ROOT,
                timeout=budget + GRACE_S,
                check=False,
            )
            status = "ok" if done.returncode == 0 else "failed"
            record["returncode"] = done.returncode
        except subprocess.TimeoutExpired:
            status = "stopped"
            record["note"] = f"stopped after its budget and {GRACE_S:.0f} s grace"
    record |= {"status": status, "wall_s": round(time.monotonic() - start, 2)}
    tail = log.read_text(errors="replace").splitlines()[-15:]
    record["log_tail"] = "\n".join(tail)
    print(f"   {status} in {record['wall_s']} s", flush=True)
    if status != "ok":
        print("\n".join(tail), flush=True)
    return record


def part_budget(left: float, share: float, later: float, total: float) -> float:
    """Seconds for a part: what the later parts' planned shares leave of ``left``.

    A part gets its share plus whatever earlier parts left unused; once behind the
    plan, its proportional part of what is left. Always :data:`GRACE_S` short of
    ``left``, so that a part stopped at its grace still ends inside the suite's budget.

    Args:
        left: Seconds left of the suite's budget.
        share: The part's planned fraction of the budget.
        later: The later parts' planned fraction.
        total: The suite's budget in seconds.
    """
    budget = max(left - later * total, share / (share + later) * left)
    return min(budget, left - GRACE_S)


def main(c: SuiteConfig) -> Path:
    """Run the parts within ``c.budget_s``; write suite.json, suite.md and suite.png.

    Returns:
        The output folder.
    """
    out = c.out or _default_out(c)
    out.mkdir(parents=True, exist_ok=True)
    parts = plan(c, out)
    deadline = time.monotonic() + c.budget_s
    planned = sum(p.share for p in parts)
    records: list[dict[str, object]] = []
    for i, part in enumerate(parts):
        left = deadline - time.monotonic()
        later = sum(p.share for p in parts[i + 1 :]) / planned
        budget = part_budget(left, part.share / planned, later, c.budget_s)
        if budget < MIN_PART_S:
            records.append({"part": part.name, "status": "skipped", "note": "no time left"})
            print(f"== {part.name}: skipped, no time left", flush=True)
            continue
        records.append(_run_part(part, budget, out))
    meta = {"config": {k: str(v) for k, v in asdict(c).items()}, "parts": records}
    (out / "suite.json").write_text(json.dumps(meta, indent=1) + "\n")
    try:  # the tables need gradlens to import; the records and logs are written already
        from gradlens_bench.suite_report import report

        print(report(out, records))
    except Exception:
        traceback.print_exc()
    if c.archive is not None:
        with tarfile.open(c.archive, "w:gz") as tar:
            tar.add(out, arcname=out.name, filter=_no_run_data)
        print(f"archive: {c.archive}")
    return out


def _no_run_data(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Leave the MNIST run's own files (models, per-step records) out of the archive."""
    return None if "/mnist/run/" in info.name + "/" and info.isfile() else info


def _default_out(c: SuiteConfig) -> Path:
    import torch

    try:
        from gradlens_bench.results import device_slug

        slug = device_slug(torch.device(c.device))
    except Exception:  # gradlens does not import: a folder all the same
        slug = re.sub(r"[^a-z0-9]+", "-", c.device.lower())
    if c.device.startswith("cuda") and not c.tiny:
        return ROOT / "docs" / "results" / "gpu" / slug
    return ROOT / "runs" / "gpu_suite" / (slug + ("-tiny" if c.tiny else ""))


def parse_args(argv: list[str] | None = None) -> tuple[SuiteConfig, bool]:
    """The suite's configuration from the command line, and whether to only print the plan."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small sizes and few calls (a dry run)")
    p.add_argument("--budget", type=float, default=None, help="seconds in all (420; tiny 1500)")
    p.add_argument("--out", type=Path, default=None, help="default docs/results/gpu/<device>/")
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw")
    p.add_argument("--parts", default="", help="comma-separated part names (default all)")
    p.add_argument("--archive", type=Path, default=None, help="also write a .tar.gz of the folder")
    p.add_argument("--dry-run", action="store_true", help="print the parts and budgets only")
    p.add_argument("--env-check", action="store_true", help="print versions and the device only")
    p.add_argument(
        "--report", type=Path, default=None, help="only redraw suite.md/png of a suite folder"
    )
    a = p.parse_args(argv)
    if a.env_check:
        env_check(a.device)
        raise SystemExit(0)
    if a.report is not None:
        from gradlens_bench.suite_report import report

        print(report(a.report, json.loads((a.report / "suite.json").read_text())["parts"]))
        raise SystemExit(0)
    config = SuiteConfig(
        device=a.device,
        tiny=a.tiny,
        budget_s=a.budget or (1500.0 if a.tiny else SuiteConfig.budget_s),
        out=a.out,
        data_dir=a.data_dir,
        parts=tuple(x for x in a.parts.split(",") if x),
        archive=a.archive,
    )
    return config, a.dry_run


if __name__ == "__main__":
    config, dry = parse_args()
    if dry:
        out = config.out or Path("<out>")
        for part in plan(config, out):
            seconds = part.share * config.budget_s
            command = [a.replace("{budget}", f"{seconds:.0f}") for a in part.command]
            print(f"{part.name} (about {seconds:.0f} s): {shlex.join(command)}")
    else:
        main(config)
