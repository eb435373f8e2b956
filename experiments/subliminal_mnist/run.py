"""The whole experiment: every (seed, condition) part, then the combined results.

:func:`run_experiment` is what ``experiments/mnist_aux.py`` runs. It checks
the settings before any data or training (:func:`check_run`), reuses the
complete parts of an earlier run of the same configuration and code
(:func:`~subliminal_mnist.resume.plan_resume`), runs the others in this process
(:func:`~subliminal_mnist.dispatch.run_seed`, one seed's block at a time,
holding their locks) or as submitit jobs (:func:`~subliminal_mnist.run_parts`);
parts that jobs of an earlier run are still running are waited for, never run
twice. It merges the parts into ``mnist_aux.nc`` (whose ``part_versions`` attr
names the code of each part), ``mnist_aux_compact.nc``, the figures and ``summary.md``.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from gradlens.numerics import flush_denormal
from gradlens.records.provenance import make_attrs, run_provenance
from gradlens.sweeps import CodeVersion, PartLockedError, code_version, hold_parts, wait_for_parts
from subliminal_mnist.blocks import MAX_MODELS, combine_blocks
from subliminal_mnist.compact import write_compact
from subliminal_mnist.conditions import get_conditions
from subliminal_mnist.data import train_size
from subliminal_mnist.dispatch import Dispatch, PartSettings, load_splits, run_parts, run_seed
from subliminal_mnist.figures import save_figures
from subliminal_mnist.report import summary_markdown
from subliminal_mnist.resume import (
    Resume,
    check_settings,
    part_path,
    plan_resume,
    write_combined,
    write_summary,
)
from subliminal_mnist.student import StudentSetup

__all__ = ["ExperimentConfig", "check_run", "check_values", "run_experiment"]


class ExperimentConfig(Protocol):
    """The settings :func:`run_experiment` reads: ``mnist_aux.py``'s ``Config``, or alike.

    It must also be a dataclass instance or a Mapping, stored as JSON in every
    file (:func:`gradlens.records.provenance.make_attrs`).
    """

    @property
    def seeds(self) -> int:
        """Blocks of ``models`` models, seeds ``0 .. seeds - 1``."""

    @property
    def models(self) -> int:
        """Models per seed block, trained at once."""

    @property
    def conditions(self) -> Sequence[str]:
        """Condition names, in the order of the results."""

    @property
    def sizes(self) -> Sequence[int]:
        """Layer widths of the MLPs."""

    @property
    def teacher_epochs(self) -> int:
        """Teacher training epochs."""

    @property
    def teacher_batch_size(self) -> int:
        """Teacher batch size."""

    @property
    def teacher_lr(self) -> float:
        """Teacher learning rate."""

    @property
    def student(self) -> StudentSetup:
        """How the students are distilled and probed."""

    @property
    def probe_size(self) -> int:
        """Labelled images of the trait gradient."""

    @property
    def out(self) -> Path:
        """The output folder."""

    @property
    def data_dir(self) -> str | None:
        """The folder holding ``MNIST/raw`` (``None``: ``$GRADLENS_DATA_DIR``)."""

    @property
    def device(self) -> str:
        """The torch device."""

    @property
    def progress(self) -> bool:
        """Show progress bars."""

    @property
    def overwrite(self) -> bool:
        """Run every part again and replace the results in ``out``."""

    @property
    def reuse_other_versions(self) -> bool:
        """Reuse complete parts computed by another gradlens version or git commit."""


def check_run(config: ExperimentConfig, dispatch: Dispatch) -> torch.device:
    """Check what would fail only after data loading or training; create ``config.out``.

    The condition names, the flags' ranges (:func:`check_values`), the number
    of seeds, the device (on this machine, unless the parts run as SLURM jobs)
    and that ``config.out`` can be written.

    Returns:
        The torch device.

    Raises:
        ValueError: For an unknown condition, a value out of its range, no seeds
            or a missing device.
        OSError: If ``config.out`` cannot be created or written to.
    """
    get_conditions(config.conditions)
    check_values(config)
    return check_settings(
        seeds=config.seeds,
        device=config.device,
        out=config.out,
        available=dispatch.executor != "slurm",
    )


def check_values(config: ExperimentConfig) -> None:
    """Check that every numeric flag is in its range, naming the flag and the range.

    Raises:
        ValueError: ``--models`` outside 1..MAX_MODELS, ``--probe-size`` outside
            1..60000 (the training images; 50000 under ``--protocol rerun``),
            ``--liminal-lambda0`` negative or not finite, ``--sgd-lr`` not a finite
            positive number, an unknown ``--protocol``.
    """
    student = config.student
    images = train_size(getattr(config, "protocol", None))
    bad = [
        ("--models", config.models, 1 <= config.models <= MAX_MODELS, f"in 1..{MAX_MODELS}"),
        (
            "--probe-size",
            config.probe_size,
            1 <= config.probe_size <= images,
            f"in 1..{images} (the training images)",
        ),
        (
            "--liminal-lambda0",
            student.liminal_lambda0,
            math.isfinite(student.liminal_lambda0) and student.liminal_lambda0 >= 0,
            "a finite number >= 0 (the liminal weight at step 0)",
        ),
        (
            "--sgd-lr",
            student.sgd_lr,
            math.isfinite(student.sgd_lr) and student.sgd_lr > 0,
            "a finite number > 0",
        ),
    ]
    for flag, value, ok, allowed in bad:
        if not ok:
            raise ValueError(f"{flag} must be {allowed}, got {value}.")


def run_experiment(config: ExperimentConfig, dispatch: Dispatch | None = None) -> Path:
    """Run every seed and condition; write the netCDF files, figures and summary.

    Args:
        config: The experiment's settings.
        dispatch: Where the (seed, condition) parts run: in this process
            (``inline``, the default) or as submitit jobs (``local``, ``slurm``).

    Returns:
        The path of the combined netCDF file, ``config.out / "mnist_aux.nc"``.

    Raises:
        ValueError, OSError: As :func:`check_run`.
        FileExistsError: If ``config.out`` holds results of another
            configuration (``overwrite`` replaces them).
    """
    with flush_denormal():
        return _run(config, dispatch or Dispatch())


def _run(config: ExperimentConfig, dispatch: Dispatch) -> Path:
    start = time.perf_counter()
    provenance = run_provenance()  # the code that runs, not the code at the end of the run
    # Everything that can fail without data or training fails here, before them.
    device = check_run(config, dispatch)
    names = list(config.conditions)
    seeds = list(range(config.seeds))
    inline = dispatch.executor == "inline"
    plan = _plan(config, seeds, names, code_version(provenance))
    if plan.running and inline:  # the jobs of an earlier run: wait for them, then look again
        print(
            f"waiting for {len(plan.running)} parts that earlier jobs are running in {config.out}"
        )
        held = wait_for_parts(part_path(config.out, s, c) for s, c in plan.running)
        if held:
            path, lock = next(iter(held.items()))
            raise PartLockedError(path, lock.path, lock.holder, lock.state)
        plan = _plan(config, seeds, names, code_version(provenance))
    parts = plan.reuse
    if parts:
        print(
            f"resuming in {config.out}: {len(parts)} of {len(seeds) * len(names)} parts "
            "are complete and reused (--overwrite runs them again)"
        )
    if plan.other_versions:
        print(
            f"{len(plan.other_versions)} complete parts were computed by other code and are run "
            "again (--reuse-other-versions reuses them), e.g. "
            + next(iter(plan.other_versions.values()))
        )
    todo = {s: [c for c in names if (s, c) not in parts] for s in seeds}
    if not inline and any(todo.values()):  # as submitit jobs
        run_parts(
            config,
            seeds,
            names,
            dispatch,
            overwrite=config.overwrite,
            reuse_other_versions=config.reuse_other_versions,
        )
        parts = {(s, c): part_path(config.out, s, c) for s in seeds for c in names}
        todo = {s: [] for s in seeds}
    settings = PartSettings.from_config(config, provenance)
    with hold_parts(part_path(config.out, s, c) for s in seeds for c in todo[s]):
        if any(todo.values()):
            train, test = load_splits(settings)
        for seed in tqdm(seeds, desc="seeds", disable=not config.progress):
            if todo[seed]:
                done = run_seed(settings, seed, todo[seed], train, test)
                parts |= {(seed, name): path for name, path in done.items()}
    wall = time.perf_counter() - start
    here = dispatch.executor != "slurm"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and here else "CPU"
    device_text = f"{name} ({torch.get_num_threads()} threads)" if name == "CPU" else name
    if dispatch.executor != "inline":
        device_text = f"{device} ({dispatch.executor} submitit jobs)"
    command = "python " + shlex.join(sys.argv) if sys.argv[0].endswith(".py") else "main(config)"
    attrs = make_attrs(config, provenance=provenance) | {
        "device": device_text,
        "wall_time_s": f"{wall:.1f}",
    }
    ds = combine_blocks({(s, c): parts[s, c] for s in seeds for c in names}, attrs)
    result = write_combined(ds, config.out)
    write_compact(ds, config.out)
    save_figures(ds, config.out / "figures")
    summary = summary_markdown(ds, wall_time_s=wall, device=device_text, command=command)
    write_summary(summary, config.out)
    print(summary)
    return result


def _plan(
    config: ExperimentConfig, seeds: list[int], names: list[str], version: CodeVersion
) -> Resume:
    return plan_resume(
        config.out,
        config,
        seeds,
        names,
        overwrite=config.overwrite,
        reuse_other_versions=config.reuse_other_versions,
        version=version,
    )
