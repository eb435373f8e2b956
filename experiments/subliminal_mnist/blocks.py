"""A block of models: M (initialisation, teacher, student) triples from one seed.

Model ``m`` of the block of ``seed`` starts from :func:`~subliminal_mnist.init_mlp`
with seed :func:`model_seeds` ``[m]``; its teacher is trained from that
initialisation; its student starts there too (``init="same"``) or, for
``cross_init``, from the next model's initialisation in the block
(:func:`cross_models`, a derangement). Every (seed, condition) is one run file
with a ``model`` dim, and the teachers' and untrained references' test metrics
in its attrs (JSON), which :func:`combine_blocks` turns into variables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import xarray as xr
from torch import Tensor

from gradlens.records.atomic import atomic_write
from gradlens.records.recorder import Recorder, open_run
from gradlens.training import transform_layout
from subliminal_mnist.conditions import Condition
from subliminal_mnist.data import Digits
from subliminal_mnist.engine import run_students, stack_coords, stack_variables
from subliminal_mnist.noise import NoiseStream
from subliminal_mnist.stacked import model_params
from subliminal_mnist.stacked_step import TraitProbes, layer_names
from subliminal_mnist.student import StudentSetup, student_transforms
from subliminal_mnist.teachers import evaluate_stack

__all__ = [
    "MAX_MODELS",
    "TeacherBlock",
    "combine_blocks",
    "cross_models",
    "load_or_train_teachers",
    "model_seeds",
    "run_block_condition",
    "teacher_metrics",
    "teachers_path",
    "trait_probes",
]

MAX_MODELS = 10_000
"""Models per block at most: model ``m`` of seed ``s`` has init seed ``s * MAX_MODELS + m``."""

UNRELATED_OFFSET = 1_000_003
TEACHER_ATTR = "teacher_metrics"
TEACHER_VARIABLES = {
    "teacher_accuracy": "teacher test accuracy",
    "reference_accuracy": "untrained reference test accuracy",
}


def model_seeds(seed: int, models: int) -> list[int]:
    """The initialisation seeds of the block of ``seed``.

    Example:
        >>> model_seeds(0, 3), model_seeds(2, 2)
        ([0, 1, 2], [20000, 20001])
    """
    if not 1 <= models <= MAX_MODELS:
        raise ValueError(f"--models must be in 1..{MAX_MODELS}, got {models}.")
    return [seed * MAX_MODELS + m for m in range(models)]


def cross_models(seeds: Sequence[int]) -> list[int]:
    """The init seeds of ``cross_init`` students: the next model's, cyclically.

    A derangement (no student starts from its own teacher's initialisation);
    with one model, an unrelated seed. The original draws a random permutation
    of its 100 models, which may leave a model or two on its own init.

    Example:
        >>> cross_models([0, 1, 2]), cross_models([5])
        ([1, 2, 0], [1000008])
    """
    seeds = list(seeds)
    if len(seeds) == 1:
        return [seeds[0] + UNRELATED_OFFSET]
    return seeds[1:] + seeds[:1]


class TeacherBlock(NamedTuple):
    """What every condition of a block shares.

    Attributes:
        seeds: The models' init seeds.
        init: The reference initialisations, ``name -> (model, ...)``.
        teachers: The trained teachers.
        metrics: ``teacher_accuracy`` and ``reference_accuracy``, one value per model.
        noise: The block's noise stream.
        probes: The trait probes.
    """

    seeds: list[int]
    init: dict[str, Tensor]
    teachers: dict[str, Tensor]
    metrics: dict[str, list[float]]
    noise: NoiseStream
    probes: TraitProbes


def trait_probes(train: Digits, size: int, seed: int, test: Digits | None = None) -> TraitProbes:
    """Two disjoint sets of labelled images and shuffled probe labels.

    The first ``size`` images of a random permutation of the training set give
    the trait gradient that the interventions act along; the next ``size`` the
    held-out trait gradient no transform sees; the shuffled labels are a fixed
    permutation of the probe's labels. A probe of more than half the training
    set (up to all of it) leaves too few training images to hold out: the
    held-out set is then ``min(size, len(test))`` random images of ``test``,
    which the trait gradient never sees either.

    Raises:
        ValueError: If ``size`` is not in ``1..len(train)``, or exceeds half of
            it without a ``test`` split to hold out from.
    """
    n = len(train.labels)
    if not 0 < size <= n:
        raise ValueError(f"--probe-size must be in 1..{n} (the training images), got {size}.")
    if 2 * size > n and test is None:
        raise ValueError(
            f"--probe-size {size} leaves fewer than {size} training images to hold out; "
            f"pass the test split (test=) to hold out from it, or use at most {n // 2}."
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    probe = order[:size].to(train.labels.device)
    shuffle = torch.randperm(size, generator=gen).to(train.labels.device)
    if 2 * size <= n:
        held, source = order[size : 2 * size].to(train.labels.device), train
    else:
        assert test is not None  # checked above
        pick = torch.randperm(len(test.labels), generator=gen)[: min(size, len(test.labels))]
        held, source = pick.to(test.labels.device), test
    return TraitProbes(
        train.images[probe],
        train.labels[probe],
        source.images[held],
        source.labels[held],
        train.labels[probe][shuffle],
    )


def teachers_path(out: Path, seed: int) -> Path:
    """Where the trained teachers of the block of ``seed`` are kept for reruns."""
    return out / "parts" / f"seed{seed}_teachers.pt"


def load_or_train_teachers(
    path: Path, init: Mapping[str, Tensor], key: str, train: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The block's trained teachers from ``path`` if it was written with ``key``, else trained.

    ``key`` names everything the teachers depend on (the init seeds, the sizes,
    the teacher's hyper-parameters, the device); a file with another key is
    trained again and replaced (atomically). Teachers are deterministic given
    the key on one machine, so this only saves time: a rerun, or a run adding
    conditions, does not train them again.
    """
    if path.exists():
        stored = torch.load(path, map_location=next(iter(init.values())).device)
        if stored.get("key") == key:
            return stored["teachers"]
    teachers = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"key": key, "teachers": teachers}, tmp))
    return teachers


def teacher_metrics(
    init: Mapping[str, Tensor], teachers: Mapping[str, Tensor], test: Digits
) -> dict[str, list[float]]:
    """``teacher_accuracy`` and ``reference_accuracy`` per model, as lists."""
    return {
        "teacher_accuracy": evaluate_stack(teachers, test)["test_accuracy"].tolist(),
        "reference_accuracy": evaluate_stack(init, test)["test_accuracy"].tolist(),
    }


def run_block_condition(
    condition: Condition,
    block: TeacherBlock,
    *,
    seed: int,
    test: Digits,
    setup: StudentSetup,
    path: Path,
    config: object,
    progress: bool = True,
) -> Path:
    """Distil the block's students under ``condition`` and record them to ``path``.

    Written to ``path + ".part"``, marked complete and renamed to ``path`` when complete.
    """
    init = block.init
    if condition.init == "cross":
        order = cross_models(block.seeds)
        if len(block.seeds) > 1:
            index = [block.seeds.index(s) for s in order]
            init = {n: v[index] for n, v in block.init.items()}
        else:
            from subliminal_mnist.stacked import init_stack

            init = init_stack(_sizes(block.init), order)
    single = model_params(init, 0)
    layout = transform_layout(single, *student_transforms(condition, block.noise.steps_per_epoch))
    partial = path.with_name(path.name + ".part")
    attrs = {
        "condition": condition.name,
        "seed": seed,
        "init_seeds": json.dumps(
            cross_models(block.seeds) if condition.init == "cross" else block.seeds
        ),
        TEACHER_ATTR: json.dumps(block.metrics),
    }
    with Recorder(
        partial,
        stack_variables(condition, layout),
        coords=stack_coords(layer_names(single), layout, block.seeds, setup.example_models),
        attrs=attrs,
        config=config,
        overwrite=True,
    ) as recorder:
        run_students(
            condition,
            init,
            block.teachers,
            block.noise,
            block.probes,
            test,
            recorder,
            setup=setup,
            progress=progress,
        )
    os.replace(partial, path)
    return path


def _part_versions(opened: Mapping[tuple[int, str], xr.Dataset]) -> str:
    """Each part's code version from its provenance attrs, as JSON (netCDF-safe)."""
    fields = ("gradlens_version", "git_commit", "git_dirty")
    return json.dumps(
        {
            f"seed{seed}_{condition}": {f: _plain(run.attrs.get(f, "unknown")) for f in fields}
            for (seed, condition), run in opened.items()
        }
    )


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


def _sizes(stack: Mapping[str, Tensor]) -> list[int]:
    weights = [v for n, v in stack.items() if n.endswith("weight")]
    return [weights[0].shape[2], *(w.shape[1] for w in weights)]


def combine_blocks(parts: Mapping[tuple[int, str], Path], attrs: Mapping[str, str]) -> xr.Dataset:
    """Merge per-(seed, condition) block files into one Dataset.

    Model coords are the init seeds, so blocks of different seeds never share
    a model; a variable is NaN for models outside its block. Variables that
    only some conditions have are NaN elsewhere. The teachers' and references'
    accuracies become variables along ``model``. The code that computed each
    part is listed in the ``part_versions`` attr (JSON: ``seed{s}_{condition}``
    -> its ``gradlens_version``, ``git_commit`` and ``git_dirty``).

    Returns:
        Dims ``step``, ``model``, ..., ``condition``; ``seed`` is a coordinate
        along ``model`` (the block each model came from).
    """
    opened = {key: open_run(path) for key, path in parts.items()}
    runs = [run.expand_dims(condition=[condition]) for (_, condition), run in opened.items()]
    merged = xr.merge(runs, combine_attrs="drop_conflicts", join="outer", compat="no_conflicts")
    conditions = list(dict.fromkeys(c for _, c in parts))
    merged = merged.reindex(condition=conditions)
    merged.attrs = dict(attrs) | {"part_versions": _part_versions(opened)}
    for variable in merged.variables.values():
        variable.encoding = {}
    metrics: dict[str, dict[int, float]] = {name: {} for name in TEACHER_VARIABLES}
    seed_of: dict[int, int] = {}
    for (seed, _), run in opened.items():
        stored = json.loads(run.attrs[TEACHER_ATTR])
        for name in TEACHER_VARIABLES:
            for model, value in zip(run.model.values.tolist(), stored[name], strict=True):
                metrics[name][model] = value
                seed_of[model] = seed
    models = merged.model.values.tolist()
    for name, long_name in TEACHER_VARIABLES.items():
        merged[name] = (
            "model",
            [metrics[name][m] for m in models],
            {"long_name": long_name, "units": "1"},
        )
    merged = merged.assign_coords(
        seed=("model", [seed_of[m] for m in models], {"long_name": "block seed", "units": "1"})
    )
    order = [d for d in ("step", "model") if d in merged.dims]
    return merged.transpose(*order, ..., "condition")
