"""experiments/mnist_probe_noise.py: its committed table recomputes, and bad sizes are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import xarray as xr
from mnist_probe_noise import main, plot, summary

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "probe_noise"


def test_the_committed_table_recomputes_from_its_file() -> None:
    ds = xr.load_dataset(RESULTS / "probe_noise.nc")
    table = summary(ds)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + ds.sizes["student_step"] * ds.sizes["probe_size"]
    committed = (RESULTS / "summary.md").read_text()
    for row in rows:
        assert row in committed, row
    assert len(plot(ds).axes) == 3


def test_the_estimate_approaches_the_full_trait_gradient_as_the_probe_grows() -> None:
    """A property of the committed data the docs rely on, not a tuned number."""
    ds = xr.load_dataset(RESULTS / "probe_noise.nc")
    full = ds["full_cosine"].mean(["model", "draw"])
    spread = ds["cosine"].std("draw", ddof=1).mean("model")
    for state in ds.student_step.values:
        assert (full.sel(student_step=state).diff("probe_size") > 0).all()
        assert (spread.sel(student_step=state).diff("probe_size") < 0).all()


def test_fewer_than_two_models_or_draws_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--models", "1", "--out", str(tmp_path)])
