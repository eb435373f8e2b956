"""The committed results recompute: every table row in the docs comes from a committed file."""

from __future__ import annotations

from pathlib import Path

import pytest
import xarray as xr

from gradlens.mnist import summary_markdown

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "docs" / "results").glob("*/mnist_aux_compact.nc"))


def table_rows(text: str) -> list[str]:
    """The data rows of the markdown tables (not headers or separators)."""
    starts = ("| teacher", "| reference", "| student `", "| `")
    return [line for line in text.splitlines() if line.startswith(starts)]


@pytest.mark.parametrize("path", RESULTS, ids=[p.parent.name for p in RESULTS])
def test_the_summary_table_recomputes_from_the_committed_file(path: Path) -> None:
    ds = xr.load_dataset(path)
    rows = table_rows(summary_markdown(ds, wall_time_s=0.0, device="", command=""))
    assert len(rows) >= 3  # teacher, reference and at least one condition
    committed = (path.parent / "summary.md").read_text()
    for row in rows:
        assert row in committed, f"{path.parent.name}/summary.md lacks the recomputed row {row!r}"


SECTION = "## Results: many models at once"


def test_every_results_row_quoted_in_the_docs_is_in_a_committed_summary() -> None:
    """A row of a results table in docs/experiment.md's section on the stacked runs is one
    of the rows recomputed from a committed file."""
    recomputed = {
        row
        for path in RESULTS
        for row in table_rows(
            summary_markdown(xr.load_dataset(path), wall_time_s=0.0, device="", command="")
        )
    }
    assert RESULTS, "no committed compact results under docs/results/*/"
    for doc in (ROOT / "docs" / "experiment.md",):
        text = doc.read_text()
        assert SECTION in text, f"{doc.name} has no section {SECTION!r}"
        section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
        quoted = [r for r in table_rows(section) if r.startswith(("| student `", "| `"))]
        assert quoted, f"{doc.name} quotes no results row"
        for row in quoted:
            assert row in recomputed, f"{doc.name} quotes a row no committed file gives: {row!r}"
