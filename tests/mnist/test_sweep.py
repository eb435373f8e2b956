"""Sweeps of one setting over runs: finals along the swept dim, the paired table, the files."""

from __future__ import annotations

from pathlib import Path

import mnist_sweep
import numpy as np
import pytest
import xarray as xr
from scipy import stats

from subliminal_mnist.sweep import (
    SWEEP_FILE,
    match_markdown,
    matched_value,
    plot_sweep,
    sweep_finals,
    sweep_markdown,
)

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "docs" / "results").glob(f"*/{SWEEP_FILE}"))


def _run(conditions: list[str], models: list[int], seed: int) -> xr.Dataset:
    """A run with the variables ``final_values`` reads: 4 steps, evaluated at steps 1 and 3."""
    rng = np.random.default_rng(seed)
    shape = (4, len(conditions), len(models))
    evaluated = np.where(np.arange(4)[:, None, None] % 2 == 1, 1.0, np.nan)
    dims = ("step", "condition", "model")
    data = {
        name: (dims, rng.uniform(size=shape) * (evaluated if name.startswith("test") else 1.0))
        for name in (
            "test_accuracy",
            "test_loss",
            "test_entropy",
            "test_majority",
            "cosine",
            "update_cosine",
            "distill_loss",
        )
    }
    coords = {"step": np.arange(4), "condition": conditions, "model": models}
    return xr.Dataset(data, coords=coords)


def test_finals_go_along_the_swept_dim_and_shared_conditions_fill_in() -> None:
    shared = _run(["aux", "liminal"], [0, 1, 2], seed=0)
    runs = {0.5: _run(["liminal"], [0, 1, 2], seed=1), 1.0: shared}
    finals = sweep_finals(
        runs,
        dim="lambda0",
        conditions=["aux", "liminal"],
        commands={0.5: "a", 1.0: "b"},
        shared=shared,
    )
    assert dict(finals.sizes) == {"lambda0": 2, "condition": 2, "model": 3}
    last = shared["test_accuracy"].isel(step=3)
    for value in (0.5, 1.0):  # the shared aux stands in at every value
        got = finals["test_accuracy"].sel(lambda0=value, condition="aux")
        np.testing.assert_array_equal(got, last.sel(condition="aux"))
    np.testing.assert_array_equal(
        finals["test_accuracy"].sel(lambda0=0.5, condition="liminal"),
        runs[0.5]["test_accuracy"].isel(step=3).sel(condition="liminal"),
    )
    assert finals.attrs["commands"] == "lambda0=0.5: a\nlambda0=1: b"


def test_a_run_lacking_a_condition_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"lacks the condition 'aux'.*shared run"):
        sweep_finals(
            {1.0: _run(["liminal"], [0], seed=0)},
            dim="lambda0",
            conditions=["aux", "liminal"],
            commands={1.0: ""},
        )


def test_the_table_pairs_models_within_a_row_only() -> None:
    small, large = _run(["aux", "remove"], [0, 1, 2], 3), _run(["aux", "remove"], [0, 1], 4)
    finals = sweep_finals(
        {256: small, 60000: large},
        dim="probe_size",
        conditions=["aux", "remove"],
        commands={256: "x", 60000: "y"},
    )
    text = sweep_markdown(finals, dim="probe_size")
    rows = [line for line in text.splitlines() if line.startswith(("| 256 ", "| 60000 "))]
    assert len(rows) == 2
    for row, run in zip(rows, (small, large), strict=True):
        acc = run["test_accuracy"].isel(step=3)
        a, b = acc.sel(condition="remove").values, acc.sel(condition="aux").values
        expected = stats.ttest_rel(a, b)
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == str(len(a))
        assert cells[3].startswith(f"{100 * (a - b).mean():.1f} ± ")
        assert cells[4] == f"{expected.pvalue:.2g}"
    fig = plot_sweep(finals, dim="probe_size", xlabel="probe images", log=True)
    assert len(fig.axes) == 3


@pytest.mark.parametrize("path", SWEEPS, ids=[p.parent.name for p in SWEEPS])
def test_a_committed_sweep_table_recomputes_from_its_file(path: Path) -> None:
    finals = xr.load_dataset(path)
    (dim,) = (d for d in finals.dims if d not in ("condition", "model"))
    assert (path.parent / "summary.md").read_text() == sweep_markdown(finals, dim=dim)


def test_the_cli_records_its_own_command_and_what_the_shared_run_stands_in_for(
    tmp_path: Path,
) -> None:
    folders = {
        "lam0": _run(["liminal"], [0, 1, 2], seed=1),
        "base": _run(["aux", "liminal"], [0, 1, 2], seed=0),
    }
    for name, ds in folders.items():
        (tmp_path / name).mkdir()
        ds.to_netcdf(tmp_path / name / "mnist_aux_compact.nc")
        (tmp_path / name / "summary.md").write_text(f"Command: `run {name}`  \n")
    argv = [
        "--dim", "lambda0", "--conditions", "aux", "liminal",
        "--run", f"0={tmp_path / 'lam0'}", "--run", f"1={tmp_path / 'base'}",
        "--shared", str(tmp_path / "base"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    out = mnist_sweep.main(argv)
    summary = (out / "summary.md").read_text()
    made_by = "python experiments/mnist_sweep.py " + " ".join(argv)
    assert f"Made by `{made_by}` from these runs:" in summary
    assert "- `aux` where a run lacks it: `run base`" in summary
    assert "- `lambda0=0: run lam0`" in summary
    assert summary == sweep_markdown(xr.load_dataset(out / SWEEP_FILE), dim="lambda0")


@pytest.mark.parametrize("path", SWEEPS, ids=[p.parent.name for p in SWEEPS])
def test_the_sweep_figure_clips_accuracy_intervals_to_0_100(path: Path) -> None:
    """The committed probe-size sweep has a 3-model row whose t interval passes 0 and 100%;
    the accuracy panels draw it within [0, 100]."""
    finals = xr.load_dataset(path)
    (dim,) = (d for d in finals.dims if d not in ("condition", "model"))
    fig = plot_sweep(finals, dim=dim, xlabel=dim)
    for ax in (fig.axes[0], fig.axes[2]):  # accuracy over the setting; accuracy vs loss
        ys = [y for c in ax.collections for seg in c.get_segments() for _, y in seg]
        assert ys and min(ys) >= -1e-9 and max(ys) <= 100.0 + 1e-9


def test_the_lr_matched_on_the_final_distillation_loss_is_named(tmp_path: Path) -> None:
    """--match distill_loss: the value whose mean final loss is nearest aux's, on a log scale."""
    base = _run(["aux"], [0, 1, 2], seed=0)
    aux_loss = float(base["distill_loss"].isel(step=-1).mean())
    runs = {}
    for lr, factor in ((0.3, 8.0), (1.0, 1.5), (3.0, 0.5)):  # 1.5x beats 1/0.5 = 2x
        run = _run(["sgd"], [0, 1, 2], seed=1)
        last = xr.full_like(run["distill_loss"].isel(step=-1), aux_loss * factor)
        run["distill_loss"] = run["distill_loss"].where(run.step < 3, last)
        (tmp_path / f"lr{lr:g}").mkdir()
        run.to_netcdf(tmp_path / f"lr{lr:g}" / "mnist_aux_compact.nc")
        runs[lr] = run
    (tmp_path / "aux").mkdir()
    base.to_netcdf(tmp_path / "aux" / "mnist_aux_compact.nc")
    argv = [
        "--dim", "sgd_lr", "--log", "--conditions", "aux", "sgd",
        *(f"--run={lr:g}={tmp_path / f'lr{lr:g}'}" for lr in runs),
        "--shared", str(tmp_path / "aux"), "--match", "distill_loss",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    out = mnist_sweep.main(argv)
    finals = xr.load_dataset(out / SWEEP_FILE)
    assert matched_value(finals, dim="sgd_lr") == 1.0 == finals.attrs["matched"]
    summary = (out / "summary.md").read_text()
    assert "nearest `aux`'s (on a log scale) at **sgd_lr = 1**" in summary
    assert "| 0.3 | " in summary and "| 8 |" in summary  # the ratio column
    assert summary == sweep_markdown(finals, dim="sgd_lr")  # recomputes from the file
    # at the edge of the swept values, the section says to extend the sweep
    finals["distill_loss"].loc[{"sgd_lr": 3.0, "condition": "sgd"}] = aux_loss * 1.1
    assert matched_value(finals, dim="sgd_lr") == 3.0
    assert "extend the sweep past 3" in match_markdown(finals, dim="sgd_lr")
    finals["distill_loss"].loc[{"condition": "sgd"}] = np.nan
    with pytest.raises(ValueError, match="no sgd_lr has a finite positive mean distill_loss"):
        matched_value(finals, dim="sgd_lr")
