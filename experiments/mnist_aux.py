"""MNIST auxiliary-logit subliminal learning, probed at every student step.

Reproduces Cloud et al. 2025 (MNIST section) with gradlens probes, many models
at once, and the causal interventions of Kitkana and Arora 2026. See
docs/experiment.md.

    python experiments/mnist_aux.py                # 10 models x 3 conditions
    python experiments/mnist_aux.py --quick        # about a minute on a 2-core CPU
    python experiments/mnist_aux.py --models 100   # the original's size
    python experiments/mnist_aux.py --conditions aux remove remove_shuffled --noise fresh
    python experiments/mnist_aux.py --protocol rerun --models 25 --seeds 5   # the public rerun's
    python experiments/mnist_aux.py --seeds 10 --executor slurm --device cuda \
        --slurm-partition gpu --gpus-per-part 1 --time-limit 120   # one SLURM job per part
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from gradlens.errors import DamagedDataError, DataNotFoundError
from gradlens.sweeps import PartLockedError
from subliminal_mnist import (
    BASE_CONDITIONS,
    CONDITIONS,
    EXECUTORS,
    NOISE_KINDS,
    Dispatch,
    StudentSetup,
    check_run,
    run_experiment,
)
from subliminal_mnist.data import PROTOCOLS, RERUN_HELD_OUT, SPLIT_SIZES


@dataclass(frozen=True)
class Config:
    """Every setting of the experiment; the defaults are the README's main job.

    ``seeds`` blocks of ``models`` models each; statistics are over all models.
    """

    seeds: int = 1
    models: int = 10
    conditions: tuple[str, ...] = BASE_CONDITIONS
    sizes: tuple[int, ...] = (784, 256, 256, 13)
    teacher_epochs: int = 5
    teacher_batch_size: int = 1024
    teacher_lr: float = 3e-4
    student: StudentSetup = field(default_factory=StudentSetup)
    probe_size: int = 1024
    out: Path = Path("runs/mnist_aux")
    data_dir: str | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    progress: bool = True
    overwrite: bool = False
    reuse_other_versions: bool = False
    protocol: str | None = None
    """``None``: the original's data (the teachers learn from all 60,000 training
    images); ``"rerun"``: the public rerun's (:func:`rerun`). ``None`` rather than
    ``"original"`` so that files written before this field compare equal."""


def rerun(config: Config) -> Config:
    """The public rerun's protocol (barathvelmu/subliminal-learning ``mnist/experiment.py``).

    Its ``load_splits`` holds ``VAL_SIZE = 10_000`` training images out (a fixed
    permutation, ``SPLIT_SEED = 1234``): the teachers learn from the other 50,000
    and each student distils on 50,000 noise images an epoch (49 steps; 245 in 5
    epochs), as its ``make_distill_inputs`` draws noise shaped like the training
    images. The probes come from the same 50,000. With :func:`quick`'s fewer noise
    images, those are kept.
    """
    images = SPLIT_SIZES["train"] - RERUN_HELD_OUT
    student = dataclasses.replace(
        config.student, noise_per_epoch=min(config.student.noise_per_epoch, images)
    )
    return dataclasses.replace(config, protocol="rerun", student=student)


def quick(config: Config) -> Config:
    """A reduced run for a smoke test: 3 models, 1 teacher epoch, 40 student steps."""
    student = dataclasses.replace(
        config.student,
        epochs=2,
        noise_per_epoch=20 * 1024,
        eval_every=5,
        store_every=10,
    )
    return dataclasses.replace(config, models=3, teacher_epochs=1, student=student)


def main(config: Config, dispatch: Dispatch | None = None) -> Path:
    """Run every seed and condition; write the netCDF file, figures and summary.

    Args:
        config: The experiment's settings.
        dispatch: Where the (seed, condition) parts run: in this process
            (``inline``, the default) or as submitit jobs (``local``, ``slurm``).

    Returns:
        The path of the combined netCDF file.
    """
    return run_experiment(config, dispatch)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (about a minute)")
    parser.add_argument(
        "--models", type=int, help="models per seed, trained at once (default 10; 3 with --quick)"
    )
    parser.add_argument("--seeds", type=int, help="blocks of --models models (default 1)")
    parser.add_argument(
        "--noise",
        choices=NOISE_KINDS,
        help="fixed: one noise set per model reused every epoch (the original's, default); "
        "fresh: new noise every batch",
    )
    parser.add_argument(
        "--conditions",
        nargs="+",
        choices=sorted(CONDITIONS),
        metavar="NAME",
        help=f"conditions to run, from {sorted(CONDITIONS)}",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="original: the teachers learn from all 60,000 training images, 60,000 noise "
        "images an epoch (default); rerun: the public rerun's 10,000 held out, 50,000 and "
        "50,000 (245 student steps)",
    )
    parser.add_argument("--trait", choices=["ce", "kl"], help="trait loss (default ce)")
    parser.add_argument(
        "--probe-size",
        type=int,
        help="labelled images of the trait gradient (default 1024, at most 60000), and as many "
        "held out (from the test split, at most 10000, above 30000)",
    )
    parser.add_argument(
        "--liminal-lambda0", type=float, help="liminal weight at step 0 (default 1)"
    )
    parser.add_argument(
        "--sgd-lr", type=float, help="learning rate of the sgd and sgd_momentum conditions (0.1)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default runs/mnist_aux)")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw (else $GRADLENS_DATA_DIR)")
    parser.add_argument("--device", help="torch device (default cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="run every part again and replace the results in --out (default: resume, reusing "
        "complete parts of the same configuration, and refuse results of another one)",
    )
    parser.add_argument(
        "--reuse-other-versions",
        action="store_true",
        help="reuse complete parts computed by another gradlens version or git commit (default: "
        "run them again; mnist_aux.nc lists each part's commit in its part_versions attr)",
    )
    jobs = parser.add_argument_group("where the (seed, condition) parts run")
    jobs.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="inline",
        help="inline: in this process, one after another (default); local: one submitit "
        "subprocess per part, all at once; slurm: one SLURM job per part (a job array). "
        "Finished parts are skipped on resubmission, and parts that jobs of an earlier run "
        "still run are waited for, not run twice",
    )
    jobs.add_argument(
        "--time-limit", type=int, default=24 * 60, help="minutes per job (default 1440)"
    )
    jobs.add_argument("--slurm-partition", help="SLURM partition of the jobs")
    jobs.add_argument("--gpus-per-part", type=int, help="GPUs per job (SLURM gpus_per_node)")
    jobs.add_argument("--cpus-per-part", type=int, help="CPUs per job (cpus_per_task)")
    jobs.add_argument(
        "--submitit",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more submitit parameters, VALUE as JSON where it parses (else a string): "
        "mem_gb=32 slurm_array_parallelism=16 slurm_account=lab",
    )
    return parser.parse_args(argv)


def parse(argv: list[str] | None = None) -> Config:
    """Map command-line flags onto a :class:`Config`."""
    args = _arguments(argv)
    config = quick(Config()) if args.quick else Config()
    if args.protocol == "rerun":
        config = rerun(config)
    if args.quick and args.out is None:
        args.out = Path("runs/mnist_aux_quick")
    changes = {
        "seeds": args.seeds,
        "models": args.models,
        "probe_size": args.probe_size,
        "conditions": tuple(args.conditions) if args.conditions else None,
        "out": args.out,
        "data_dir": args.data_dir,
        "device": args.device,
    }
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    student = {
        "trait": args.trait,
        "liminal_lambda0": args.liminal_lambda0,
        "sgd_lr": args.sgd_lr,
        "noise": args.noise,
    }
    student = {k: v for k, v in student.items() if v is not None}
    if student:
        config = dataclasses.replace(config, student=dataclasses.replace(config.student, **student))
    return dataclasses.replace(
        config,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        reuse_other_versions=args.reuse_other_versions,
    )


def parse_dispatch(argv: list[str] | None = None) -> Dispatch:
    """Map the job flags (``--executor``, ``--time-limit``, ...) onto a :class:`Dispatch`."""
    args = _arguments(argv)
    parameters: dict[str, object] = {}
    for item in args.submitit:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--submitit takes KEY=VALUE, got {item!r}.")
        try:
            parameters[key] = json.loads(value)
        except json.JSONDecodeError:
            parameters[key] = value
    named = {
        "slurm_partition": args.slurm_partition,
        "gpus_per_node": args.gpus_per_part,
        "cpus_per_task": args.cpus_per_part,
    }
    parameters |= {k: v for k, v in named.items() if v is not None}
    return Dispatch(args.executor, args.time_limit, parameters)


def cli(argv: list[str] | None = None) -> Path:
    """Parse the flags and run; a bad setting, or a refused ``--out``, ends in one line.

    Flag values (each in its range), the device and ``--out`` are checked
    before anything else (:func:`main` checks them again), and, like argparse,
    a failed check, results in ``--out`` that are not this configuration's,
    MNIST files that are missing or damaged, or a part held by a job that
    cannot be checked from here, prints ``mnist_aux.py: error: <what and the
    fix>`` and exits with status 2 instead of a traceback.
    """
    config = parse(argv)
    try:
        dispatch = parse_dispatch(argv)
        check_run(config, dispatch)
    except (ValueError, OSError) as exc:
        _exit_with(exc)
    try:
        return main(config, dispatch)
    # The refusal to replace results (--overwrite), MNIST not there or damaged, a held part.
    except (FileExistsError, DataNotFoundError, DamagedDataError, PartLockedError) as exc:
        _exit_with(exc)


def _exit_with(exc: BaseException) -> NoReturn:
    print(f"{Path(__file__).name}: error: {exc}", file=sys.stderr)
    raise SystemExit(2) from exc


if __name__ == "__main__":
    cli()
