"""The pieces of the MNIST auxiliary-logit experiment that a script strings together."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import xarray as xr
from torch import nn

from gradlens.recording import Recorder, open_run
from gradlens.training import step_coords, transform_layout
from subliminal_mnist.conditions import Condition
from subliminal_mnist.data import Digits
from subliminal_mnist.models import init_mlp
from subliminal_mnist.student import (
    StudentSetup,
    layer_names,
    run_student,
    student_transforms,
    student_variables,
)

__all__ = ["combine_runs", "cross_seed", "probe_subset", "run_condition"]

UNRELATED_SEED_OFFSET = 1_000_003
SEED_ACCURACIES = {
    "teacher_accuracy": "teacher test accuracy",
    "reference_accuracy": "untrained reference test accuracy",
}


def cross_seed(seed: int, seeds: Sequence[int]) -> int:
    """The seed whose initialisation a ``cross_init`` student of ``seed`` starts from.

    With several seeds, the next one in cyclic order: a derangement, so no
    student starts from its own teacher's initialisation. With one seed, a
    seed far from any used here.

    Example:
        >>> [cross_seed(s, [0, 1, 2]) for s in (0, 1, 2)]
        [1, 2, 0]
        >>> cross_seed(0, [0])
        1000003
    """
    seeds = list(seeds)
    if seed not in seeds:
        raise ValueError(f"seed {seed} is not among the seeds {seeds}.")
    if len(seeds) == 1:
        return seed + UNRELATED_SEED_OFFSET
    return seeds[(seeds.index(seed) + 1) % len(seeds)]


def probe_subset(train: Digits, size: int, seed: int) -> Digits:
    """A fixed random subset of the training images, for the trait gradient."""
    if not 0 < size <= len(train.labels):
        raise ValueError(f"probe size must be in 1..{len(train.labels)}, got {size}.")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train.labels), generator=gen)[:size].to(train.labels.device)
    return Digits(train.images[idx], train.labels[idx])


def run_condition(
    condition: Condition,
    teacher: nn.Module,
    *,
    sizes: Sequence[int],
    seed: int,
    seeds: Sequence[int],
    probe: Digits,
    test: Digits,
    setup: StudentSetup,
    path: Path,
    config: object,
    attrs: Mapping[str, str | int | float] | None = None,
    progress: bool = True,
) -> Path:
    """Distil one student under ``condition`` and record it to ``path``.

    The run is written to ``path + ".part"`` and renamed to ``path`` only when
    it completes, so an interrupted run never looks finished, and an earlier
    ``path`` stays until the new one is complete.

    Args:
        condition: The condition (transforms, liminal term, initialisation).
        teacher: The trained teacher, frozen.
        sizes: Layer widths of the student MLP.
        seed: The run's seed; the student starts from its initialisation
            (``"same"``) or from :func:`cross_seed`'s.
        seeds: Every seed of the experiment (for :func:`cross_seed`).
        probe: The labelled images of the trait gradient.
        test: The test digits.
        setup: How the student is distilled and probed.
        path: The file to write.
        config: The experiment's config, stored as JSON in the attrs.
        attrs: More dataset attrs of the run, for example the teacher's
            ``teacher_accuracy`` and ``reference_accuracy`` that
            :func:`combine_runs` gathers along ``seed``.
        progress: Show a progress bar.

    Returns:
        ``path``.
    """
    device = probe.images.device
    init_seed = seed if condition.init == "same" else cross_seed(seed, seeds)
    student = init_mlp(sizes, seed=init_seed).to(device)
    base = copy.deepcopy(student).requires_grad_(False)
    layout = transform_layout(dict(student.named_parameters()), *student_transforms(condition))
    variables = student_variables(condition, layout)
    partial = path.with_name(path.name + ".part")
    with Recorder(
        partial,
        variables,
        coords=step_coords(layer_names(student), layout),
        attrs={**(attrs or {}), "condition": condition.name, "seed": seed, "init_seed": init_seed},
        config=config,
        overwrite=True,
    ) as recorder:
        run_student(
            student,
            teacher,
            base,
            condition,
            probe,
            test,
            recorder,
            seed=seed,
            setup=setup,
            progress=progress,
        )
    os.replace(partial, path)
    return path


def combine_runs(parts: Mapping[tuple[int, str], Path], attrs: Mapping[str, str]) -> xr.Dataset:
    """Merge per-(seed, condition) run files into one Dataset.

    Variables that only some conditions have (transform states, the liminal
    weight) are NaN elsewhere. The parts' ``teacher_accuracy`` and
    ``reference_accuracy`` attrs, when every part has them, become variables
    along ``seed``.

    Args:
        parts: ``(seed, condition) -> path`` of completed runs.
        attrs: Dataset attrs of the result.

    Returns:
        Dims ``step``, ``layer``, ``quantile``, ``example_step``, ``example``,
        ``condition``, ``seed``, in that order where present.
    """
    opened = {key: open_run(path) for key, path in parts.items()}
    runs = [
        run.expand_dims(condition=[condition], seed=[seed])
        for (seed, condition), run in opened.items()
    ]
    merged = xr.merge(runs, combine_attrs="drop_conflicts", join="outer", compat="no_conflicts")
    conditions = list(dict.fromkeys(c for _, c in parts))
    seeds = sorted({s for s, _ in parts})
    merged = merged.reindex(condition=conditions, seed=seeds)
    merged.attrs = dict(attrs)
    for variable in merged.variables.values():
        # Encodings come from the first part read; its fixed-width string labels
        # (e.g. 6 characters for "remove") would truncate longer ones on writing.
        variable.encoding = {}
    for name, long_name in SEED_ACCURACIES.items():
        by_seed = {seed: run.attrs.get(name) for (seed, _), run in opened.items()}
        if None not in by_seed.values():
            values = [float(by_seed[seed]) for seed in seeds]
            merged[name] = ("seed", values, {"long_name": long_name, "units": "1"})
    order = [
        d for d in ("step", "layer", "quantile", "example_step", "example") if d in merged.dims
    ]
    return merged.transpose(*order, ..., "condition", "seed")
