"""Where the experiment's (seed block, condition) parts run: here, or as submitit jobs.

A part is one seed's block of models distilled under one condition, written
to ``parts/seed{s}_{condition}.nc`` (through ``.part`` and a rename, the
config in the attrs). :func:`run_seed` builds a seed's block (initialisations,
teachers, their metrics, the noise stream, the trait probes) and runs
conditions on it: :func:`~subliminal_mnist.run_experiment` calls it in this
process (``--executor inline``, every part one after another), and each job
calls it for its one part. :func:`run_parts` runs the parts through
:func:`gradlens.sweeps.run_sweep` instead, in two batches:

1. one job per seed whose teachers are not cached yet
   (:func:`~subliminal_mnist.teachers_path`, written with the same key): it
   trains the block's teachers and writes the cache, so no two jobs ever
   train (and write) the same seed's teachers;
2. one job per (seed, condition) part to run (:func:`run_part`): it loads
   MNIST, loads the seed's cached teachers and writes the part's file through
   :func:`run_seed`, as the inline loop does.

Finished parts (complete, of this code, storing the same config in every
field but :data:`~subliminal_mnist.SETTINGS_THAT_SELECT`) are skipped, and
parts that jobs of an earlier run still run (their lock is held) are waited
for, so resubmitting after a crash, a timeout, a preempted node or a killed
driver runs only what is missing, once. The caller merges the part files
(:func:`~subliminal_mnist.combine_blocks`). Every job receives a :class:`PartSettings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradlens.numerics import flush_denormal
from gradlens.records.provenance import RunProvenance, config_to_json
from gradlens.sweeps import Part, code_version, make_executor, pending_parts, run_sweep
from subliminal_mnist.blocks import (
    TeacherBlock,
    load_or_train_teachers,
    model_seeds,
    run_block_condition,
    teacher_metrics,
    teachers_path,
    trait_probes,
)
from subliminal_mnist.conditions import get_conditions
from subliminal_mnist.data import Digits, load_mnist, protocol_train
from subliminal_mnist.noise import NoiseStream
from subliminal_mnist.resume import SETTINGS_THAT_SELECT, part_path, teacher_problems
from subliminal_mnist.stacked import init_stack
from subliminal_mnist.student import StudentSetup
from subliminal_mnist.teachers import train_teacher_stack

__all__ = [
    "EXECUTORS",
    "Dispatch",
    "PartSettings",
    "load_splits",
    "run_part",
    "run_parts",
    "run_seed",
    "seed_block",
    "train_teachers_part",
]

EXECUTORS = ("inline", "local", "slurm")
"""``inline``: this process, one part after another; ``local``: a subprocess per part
here (submitit); ``slurm``: a SLURM job array (submitit)."""


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Where the parts run.

    Attributes:
        executor: One of :data:`EXECUTORS`.
        timeout_min: Each job's time limit in minutes (``local`` and ``slurm``).
        parameters: More submitit parameters (``slurm_partition``, ``gpus_per_node``,
            ``mem_gb``, ...), as ``submitit.AutoExecutor.update_parameters`` takes them.
    """

    executor: str = "inline"
    timeout_min: int = 24 * 60
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"--executor must be one of {EXECUTORS}, got {self.executor!r}.")
        if self.timeout_min < 1:
            raise ValueError(f"--time-limit must be at least 1 minute, got {self.timeout_min}.")
        if self.executor == "inline" and self.parameters:
            raise ValueError(
                f"submitit parameters {sorted(self.parameters)} were given with --executor "
                "inline, which runs no jobs; pass --executor local or slurm."
            )


@dataclasses.dataclass(frozen=True)
class PartSettings:
    """What a job needs to run one part; built from the experiment's config.

    The experiment's own config class never has to be importable where a job runs.

    Attributes:
        config: The experiment's config in its stored JSON form (every part
            file records it).
        models: Models per seed block.
        sizes: Layer widths of the MLPs.
        teacher_epochs: Teacher training epochs.
        teacher_batch_size: Teacher batch size.
        teacher_lr: Teacher learning rate.
        student: How the students are distilled and probed.
        probe_size: Labelled images of the trait gradient.
        out: The output folder.
        data_dir: The folder holding ``MNIST/raw`` (``None``: ``$GRADLENS_DATA_DIR``).
        device: The torch device the jobs compute on.
        progress: Show progress bars (in the jobs' logs).
        version: The code's ``(gradlens version, git commit)`` when the run
            started: the teachers' cache holds only this code's teachers.
        protocol: The data protocol (:data:`~subliminal_mnist.data.PROTOCOLS`;
            ``None``: the original's): which training images the teachers learn from.
    """

    config: dict[str, Any]
    models: int
    sizes: tuple[int, ...]
    teacher_epochs: int
    teacher_batch_size: int
    teacher_lr: float
    student: StudentSetup
    probe_size: int
    out: Path
    data_dir: str | None
    device: str
    progress: bool
    version: tuple[str, str]
    protocol: str | None = None

    @classmethod
    def from_config(cls, config: Any, provenance: RunProvenance | None = None) -> PartSettings:
        """The settings of ``config`` (the experiment's ``Config``, or alike).

        ``provenance``: the run's, taken when it started (by default now).
        """
        return cls(
            config=json.loads(config_to_json(config)),
            models=config.models,
            sizes=tuple(config.sizes),
            teacher_epochs=config.teacher_epochs,
            teacher_batch_size=config.teacher_batch_size,
            teacher_lr=config.teacher_lr,
            student=config.student,
            probe_size=config.probe_size,
            out=Path(config.out).resolve(),
            data_dir=config.data_dir,
            device=str(torch.device(config.device)),
            progress=config.progress,
            version=tuple(code_version(provenance)),
            protocol=getattr(config, "protocol", None),
        )


def _teacher_key(settings: PartSettings, seed: int) -> str:
    """What the seed's teachers depend on: init seeds, sizes, teacher settings, device, code."""
    teacher = (settings.teacher_epochs, settings.teacher_batch_size, settings.teacher_lr)
    seeds = model_seeds(seed, settings.models)
    key = [seeds, settings.sizes, *teacher, settings.device, *settings.version]
    if settings.protocol not in (None, "original"):  # other training images
        key.append(settings.protocol)
    return json.dumps(key)


def _teachers_cached(settings: PartSettings, seed: int) -> bool:
    path = teachers_path(settings.out, seed)
    cached = path.exists() and torch.load(path, map_location="cpu").get("key")
    return cached == _teacher_key(settings, seed)


def load_splits(settings: PartSettings) -> tuple[Digits, Digits]:
    """The protocol's training images and MNIST's test split, on ``settings.device``.

    The training images are :func:`~subliminal_mnist.data.protocol_train` of MNIST's
    training split: all 60,000, or the public rerun's 50,000.
    """
    device = torch.device(settings.device)
    train = protocol_train(load_mnist(settings.data_dir, train=True), settings.protocol)
    test = load_mnist(settings.data_dir, train=False)
    return Digits(*(t.to(device) for t in train)), Digits(*(t.to(device) for t in test))


def _teachers(
    settings: PartSettings, seed: int, init: Mapping[str, torch.Tensor], train: Digits
) -> dict[str, torch.Tensor]:
    block_seeds = model_seeds(seed, settings.models)
    return load_or_train_teachers(
        teachers_path(settings.out, seed),
        init,
        _teacher_key(settings, seed),
        lambda: train_teacher_stack(
            init,
            train,
            seeds=block_seeds,
            epochs=settings.teacher_epochs,
            batch_size=settings.teacher_batch_size,
            lr=settings.teacher_lr,
            progress=settings.progress,
        ),
    )


def seed_block(settings: PartSettings, seed: int, train: Digits, test: Digits) -> TeacherBlock:
    """The block of ``seed``: what every condition of that seed shares.

    The initialisations, the teachers (from the cache when it holds this
    block's, else trained and cached), their and the references' test
    metrics, the noise stream and the trait probes.
    """
    device = torch.device(settings.device)
    block_seeds = model_seeds(seed, settings.models)
    init = {n: v.to(device) for n, v in init_stack(settings.sizes, block_seeds).items()}
    teachers = _teachers(settings, seed, init, train)
    return TeacherBlock(
        block_seeds,
        init,
        teachers,
        teacher_metrics(init, teachers, test),
        NoiseStream.create(
            settings.student.noise,
            seeds=block_seeds,
            size=settings.student.noise_per_epoch,
            batch_size=settings.student.batch_size,
            dim=settings.sizes[0],
            device=device,
        ),
        trait_probes(train, settings.probe_size, seed, test),
    )


def run_seed(
    settings: PartSettings, seed: int, conditions: Sequence[str], train: Digits, test: Digits
) -> dict[str, Path]:
    """Build the block of ``seed`` once and distil it under each of ``conditions``.

    Args:
        settings: The experiment's part settings.
        seed: The block's seed.
        conditions: Condition names, run in this order.
        train: MNIST's training split (the teachers and the trait probes).
        test: MNIST's test split.

    Returns:
        ``condition -> parts/seed{seed}_{condition}.nc`` in ``settings.out``.
    """
    block = seed_block(settings, seed, train, test)
    paths = {}
    for condition in get_conditions(conditions):
        path = part_path(settings.out, seed, condition.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths[condition.name] = run_block_condition(
            condition,
            block,
            seed=seed,
            test=test,
            setup=settings.student,
            path=path,
            config=settings.config,
            progress=settings.progress,
        )
    return paths


def train_teachers_part(job: tuple[PartSettings, int]) -> Path:
    """A job: train the block of ``seed``'s teachers, unless cached; ``job = (settings, seed)``.

    Returns:
        The teachers' cache file.
    """
    settings, seed = job
    device = torch.device(settings.device)
    with flush_denormal():
        train, _ = load_splits(settings)
        init = init_stack(settings.sizes, model_seeds(seed, settings.models))
        _teachers(settings, seed, {n: v.to(device) for n, v in init.items()}, train)
    return teachers_path(settings.out, seed)


def run_part(job: tuple[PartSettings, int, str]) -> Path:
    """A job: distil the block of ``seed`` under ``condition`` and write its part file.

    As the inline loop does (:func:`run_seed`), with the teachers that
    :func:`train_teachers_part` cached (trained here if they are missing).

    Args:
        job: ``(settings, seed, condition name)``.

    Returns:
        ``parts/seed{seed}_{condition}.nc`` in ``settings.out``.
    """
    settings, seed, name = job
    with flush_denormal():
        train, test = load_splits(settings)
        return run_seed(settings, seed, [name], train, test)[name]


def _teachers_recorded(part: Part) -> list[str]:
    return teacher_problems(part.path)


def _failure(job: Any) -> Exception | None:
    try:
        job.result()
    except Exception as exc:  # the job's own error, re-raised by submitit
        return exc
    return None


@contextlib.contextmanager
def _importable_in_jobs() -> Iterator[None]:
    """Put the folder holding this package on ``PYTHONPATH`` while jobs are submitted.

    A job is a fresh interpreter that unpickles :func:`run_part` by its module's name, and
    local and SLURM jobs inherit the submitting process's environment (``subliminal_mnist``
    is not installed: ``experiments/mnist_aux.py`` finds it beside itself).
    """
    folder = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([folder, old] if old else [folder])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def run_parts(
    config: Any,
    seeds: Sequence[int],
    conditions: Collection[str],
    dispatch: Dispatch,
    *,
    overwrite: bool = False,
    reuse_other_versions: bool = False,
    make: Callable[..., Any] = make_executor,
) -> dict[tuple[int, str], Path]:
    """Run the experiment's parts as submitit jobs; skip the finished ones, wait for running ones.

    Teachers are trained first, one job per seed that has parts to run and no
    cached teachers, then one job per part to run (locked while it runs; a
    part that a job of an earlier run still runs is waited for, not submitted
    again). Jobs keep their pickles and logs in ``out/jobs``.

    Args:
        config: The experiment's config (``out``, ``models``, ``sizes``, ...).
        seeds: The seeds to run.
        conditions: The condition names to run.
        dispatch: ``local`` or ``slurm`` and the jobs' settings.
        overwrite: Run every part again (each replaces its file when complete).
        reuse_other_versions: Reuse complete parts computed by other code.
        make: Builds the executor (:func:`gradlens.sweeps.make_executor`'s arguments).

    Returns:
        ``(seed, condition) -> path`` of every part, in seed-major order.

    Raises:
        ValueError: If ``dispatch.executor`` is ``inline``.
        FileExistsError: If a part file holds results of another configuration
            (pass ``overwrite``).
        RuntimeError: If a job failed, naming it and the log folder.
    """
    if dispatch.executor == "inline":
        raise ValueError("run_parts runs jobs: pass Dispatch(executor='local' or 'slurm').")
    settings = PartSettings.from_config(config)
    cluster = "local" if dispatch.executor == "local" else "slurm"
    executor = make(
        settings.out / "jobs", cluster, timeout_min=dispatch.timeout_min, **dispatch.parameters
    )
    parts = [
        Part(part_path(settings.out, s, c), run_part, (settings, s, c), settings.config)
        for s in seeds
        for c in conditions
    ]
    given = {"ignore": SETTINGS_THAT_SELECT, "overwrite": overwrite, "check": _teachers_recorded}
    given["reuse_other_versions"] = reuse_other_versions
    pending = pending_parts(parts, **given)
    todo = sorted({p.arg[1] for p in pending})
    untrained = [s for s in todo if not _teachers_cached(settings, s)]
    with _importable_in_jobs():
        if untrained:
            with executor.batch():
                jobs = [executor.submit(train_teachers_part, (settings, s)) for s in untrained]
            failures = [
                f"teachers of seed {seed}: job {job.job_id} failed ({error})"
                for seed, job in zip(untrained, jobs, strict=True)
                if (error := _failure(job))
            ]
            if failures:
                raise RuntimeError(
                    "\n  ".join(failures) + f"\nTheir logs are in {executor.folder}; fix the "
                    "cause and run again (finished parts and cached teachers are reused)."
                )
        run_sweep(parts, executor, **given)
    return {(p.arg[1], p.arg[2]): p.path for p in parts}
