"""The committed results of the reduced run: the summary is what the committed data give."""

from pathlib import Path

import pytest
import xarray as xr

from subliminal_lm import COMPACT, summary_markdown

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "lm_subliminal"


def test_the_committed_summary_is_made_from_the_committed_data() -> None:
    if not (RESULTS / COMPACT).is_file():
        pytest.fail(f"{RESULTS / COMPACT} is missing: the docs' numbers must come from it.")
    ds = xr.load_dataset(RESULTS / COMPACT)
    assert ds.sizes["seed"] == 10 and ds.sizes["condition"] == 6
    assert summary_markdown(ds) == (RESULTS / "summary.md").read_text()
