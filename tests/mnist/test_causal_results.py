"""docs/causal.md's numbers recompute: the drive tables and the rows the page quotes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from mnist_drive import drive, drive_markdown, pool_aux

from subliminal_mnist import summary_markdown

ROOT = Path(__file__).resolve().parents[2]
DRIVES = sorted((ROOT / "docs" / "results").glob("*/drive*.md"))
CAUSAL = ROOT / "docs" / "causal.md"


def rows(text: str) -> list[str]:
    """A results table's data rows: by condition, student, or alpha then condition (dose.md)."""
    return [
        line
        for line in text.splitlines()
        if line.startswith(("| `", "| student `")) or re.match(r"\| -?[\d.]+ \| `", line)
    ]


def recomputed(path: Path) -> str:
    """The tables of a committed drive file, recomputed from the files its command names."""
    command = path.read_text().splitlines()[0].split("`")[1]
    args = shlex.split(command)[2:]
    ds = xr.load_dataset(ROOT / args[0])
    text = ""
    if "--aux-from" in args:
        ds = pool_aux(ds, xr.load_dataset(ROOT / args[args.index("--aux-from") + 1]))
        text = summary_markdown(ds, wall_time_s=0.0, device="", command="")
    return text + drive_markdown(ds)


@pytest.mark.parametrize("path", DRIVES, ids=[f"{p.parent.name}/{p.name}" for p in DRIVES])
def test_every_committed_drive_row_recomputes(path: Path) -> None:
    expected = rows(path.read_text())
    assert len(expected) >= 2
    again = recomputed(path)
    for row in expected:
        assert row in again, f"{path.name}: {row!r} does not recompute"


def test_the_stacked_m25_drive_is_the_issues_number() -> None:
    """aux -0.78 ± 0.03 and remove +1.01 ± 0.19 nat (issue 22), from the committed file."""
    ds = xr.load_dataset(ROOT / "docs/results/stacked_m25/mnist_aux_compact.nc")
    d = drive(ds)["drive"]
    assert d.sel(condition="aux").mean() == pytest.approx(-0.782, abs=5e-4)
    assert d.sel(condition="remove").mean() == pytest.approx(1.010, abs=5e-4)


def test_pooling_aux_refuses_other_models() -> None:
    ds = xr.load_dataset(ROOT / "docs/results/stacked_m25/mnist_aux_compact.nc")
    mine = ds.sel(condition=["remove"])
    other = ds.copy()
    other["teacher_accuracy"] = other["teacher_accuracy"] + 1e-3
    with pytest.raises(ValueError, match="not of the same models"):
        pool_aux(mine, other)
    with pytest.raises(ValueError, match="has aux already"):
        pool_aux(ds, ds)
    pooled = pool_aux(mine, ds)
    assert list(pooled.condition.values) == ["aux", "remove"]
    np.testing.assert_array_equal(
        pooled["test_accuracy"].sel(condition="aux"), ds["test_accuracy"].sel(condition="aux")
    )


def test_every_row_quoted_in_causal_md_is_in_a_committed_results_file() -> None:
    committed = {
        row for path in (ROOT / "docs" / "results").glob("*/*.md") for row in rows(path.read_text())
    }
    quoted = rows(CAUSAL.read_text().split("## Results", 1)[1])
    assert quoted, "causal.md quotes no results row"
    for row in quoted:
        assert row in committed, f"causal.md quotes a row no committed file gives: {row!r}"
    for path in re.findall(r"docs/results/[\w/.-]+\.(?:md|nc)", CAUSAL.read_text()):
        assert (ROOT / path).exists(), path
