"""The dose-response table and figure, and pooling runs of the same models."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from subliminal_mnist.dose import dose_alpha, dose_markdown, dose_runs, plot_dose
from subliminal_mnist.pool import pool_runs

KEEP = ("teacher_accuracy", "reference_accuracy", "test_accuracy", "test_loss", "predicted_change")


def run(conditions: list[str], accuracy: np.ndarray, teachers: np.ndarray) -> xr.Dataset:
    """A run of len(teachers) models: final accuracy per (condition, model), drive -accuracy / 10,
    test loss 2.3 at the first evaluation and 2 - accuracy at the last."""
    models, steps = len(teachers), 4
    drive = -accuracy / 10
    per_step = np.repeat(drive[..., None] / steps, steps, axis=-1)
    first = np.full_like(accuracy, 0.1)
    return xr.Dataset(
        {
            "teacher_accuracy": ("model", teachers),
            "reference_accuracy": ("model", np.full(models, 0.1)),
            "test_accuracy": (("eval_step", "condition", "model"), np.stack([first, accuracy])),
            "test_loss": (
                ("eval_step", "condition", "model"),
                np.stack([first + 2.2, 2.0 - accuracy]),
            ),
            "predicted_change": (("condition", "model", "step"), per_step),
        },
        coords={"condition": conditions, "eval_step": [0, 10]},
    )


def test_dose_alpha_names_the_fraction_kept() -> None:
    assert dose_alpha("aux") == 1.0
    assert dose_alpha("remove_update") == 0.0
    assert dose_alpha("scale_update_-0.5") == -0.5
    assert dose_alpha("remove") is None


def test_pooled_runs_pair_model_by_model_and_the_table_says_so() -> None:
    teachers = np.array([0.90, 0.91, 0.92, 0.93])
    rng = np.random.default_rng(0)
    acc_a = rng.uniform(0.4, 0.6, size=(2, 4))  # aux, remove
    acc_b = rng.uniform(0.1, 0.3, size=(2, 4))  # scale_update_0.5, remove_update
    a = run(["aux", "remove"], acc_a, teachers)
    b = run(["scale_update_0.5", "remove_update"], acc_b, teachers)
    pooled = pool_runs([(a, ["aux"]), (b, None)], KEEP)
    assert list(pooled.condition.values) == ["aux", "scale_update_0.5", "remove_update"]
    dose = dose_runs(pooled)
    assert list(dose["alpha"].values) == [1.0, 0.5, 0.0]
    table = dose_markdown(pooled)
    diff = (acc_b[1] - acc_a[0]) * 100  # remove_update minus aux, model by model
    half = 3.182446305284263 * diff.std(ddof=1) / 2  # t(0.975, 3) * sd / sqrt(4)
    row = next(line for line in table.splitlines() if "`remove_update`" in line)
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:3] == ["0", "`remove_update`", "4"]
    assert cells[4] == f"{diff.mean():.1f} ± {half:.1f}"
    drive = -acc_b[1] / 10
    assert cells[12].startswith(f"{drive.mean():.3f} ± ")
    change = (2.0 - acc_b[1]) - 2.3  # the test loss's last evaluation minus its first
    assert cells[9].startswith(f"{change.mean():.3f} ± ")
    assert len(plot_dose(pooled).axes) == 4


def test_pooling_refuses_other_models_and_missing_conditions() -> None:
    acc = np.full((1, 3), 0.5)
    a = run(["aux"], acc, np.array([0.9, 0.9, 0.9]))
    b = run(["remove_update"], acc, np.array([0.9, 0.9, 0.8]))
    with pytest.raises(ValueError, match="not of the same models"):
        pool_runs([(a, None), (b, None)], KEEP)
    with pytest.raises(ValueError, match=r"\['sgd'\] are not in the run"):
        pool_runs([(a, ["sgd"])], KEEP)


ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "docs" / "results").glob("*/dose.md"))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_every_committed_dose_table_recomputes_from_the_files_its_command_names(
    path: Path,
) -> None:
    command = path.read_text().splitlines()[0].split("`")[1]
    args = shlex.split(command)[2:]
    runs = []
    for flag, value in itertools.pairwise(args):
        if flag == "--run":
            file, _, names = value.partition(":")
            runs.append((xr.load_dataset(ROOT / file), names.split(",") if names else None))
    table = dose_markdown(pool_runs(runs, KEEP))
    rows = [line for line in path.read_text().splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 3
    for row in rows:
        assert row in table, f"{path.parent.name}/dose.md: {row!r} does not recompute"


def test_a_dose_table_is_committed() -> None:
    assert COMMITTED, "no docs/results/*/dose.md: the dose-response of docs/causal.md"
