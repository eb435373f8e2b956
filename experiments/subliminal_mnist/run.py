"""The whole experiment: every (seed, condition) part, then the combined results.

:func:`run_experiment` is what ``experiments/mnist_aux.py`` runs. It checks
the settings before any data or training (:func:`check_run`), reuses the
complete parts of an earlier run of the same configuration
(:func:`~subliminal_mnist.reusable_parts`), runs the others in this process
(:func:`~subliminal_mnist.dispatch.run_seed`, one seed's block at a time) or
as submitit jobs (:func:`~subliminal_mnist.run_parts`), and merges the parts
into ``mnist_aux.nc``, ``mnist_aux_compact.nc``, the figures and ``summary.md``.
"""

from __future__ import annotations

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
from subliminal_mnist.blocks import combine_blocks
from subliminal_mnist.compact import write_compact
from subliminal_mnist.conditions import get_conditions
from subliminal_mnist.dispatch import Dispatch, PartSettings, load_splits, run_parts, run_seed
from subliminal_mnist.figures import save_figures
from subliminal_mnist.report import summary_markdown
from subliminal_mnist.resume import (
    check_settings,
    part_path,
    reusable_parts,
    write_combined,
    write_summary,
)
from subliminal_mnist.student import StudentSetup

__all__ = ["ExperimentConfig", "check_run", "run_experiment"]


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


def check_run(config: ExperimentConfig, dispatch: Dispatch) -> torch.device:
    """Check what would fail only after data loading or training; create ``config.out``.

    The condition names, the number of seeds, the device (on this machine,
    unless the parts run as SLURM jobs) and that ``config.out`` can be written.

    Returns:
        The torch device.

    Raises:
        ValueError: For an unknown condition, no seeds or a missing device.
        OSError: If ``config.out`` cannot be created or written to.
    """
    get_conditions(config.conditions)
    return check_settings(
        seeds=config.seeds,
        device=config.device,
        out=config.out,
        available=dispatch.executor != "slurm",
    )


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
    parts = reusable_parts(config.out, config, seeds, names, overwrite=config.overwrite)
    if parts:
        print(
            f"resuming in {config.out}: {len(parts)} of {len(seeds) * len(names)} parts "
            "are complete and reused (--overwrite runs them again)"
        )
    todo = {s: [c for c in names if (s, c) not in parts] for s in seeds}
    if dispatch.executor != "inline" and any(todo.values()):  # as submitit jobs
        run_parts(config, seeds, names, dispatch, overwrite=config.overwrite)
        parts = {(s, c): part_path(config.out, s, c) for s in seeds for c in names}
        todo = {s: [] for s in seeds}
    settings = PartSettings.from_config(config)
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
