"""The committed results of the LM runs: each summary is what the committed data give."""

import json
from pathlib import Path

import pytest
import xarray as xr

from subliminal_lm import COMPACT, FIGURES, summary_markdown

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"

# folder: (seeds, conditions) of the run it holds
RUNS = {"lm_subliminal": (10, 6), "lm_subliminal_epochs": (10, 6)}


@pytest.mark.parametrize("folder", sorted(RUNS))
def test_the_committed_summary_is_made_from_the_committed_data(folder: str) -> None:
    path = RESULTS / folder / COMPACT
    if not path.is_file():
        pytest.fail(f"{path} is missing: the docs' numbers must come from it.")
    ds = xr.load_dataset(path)
    seeds, conditions = RUNS[folder]
    assert ds.sizes["seed"] == seeds and ds.sizes["condition"] == conditions
    assert summary_markdown(ds) == (RESULTS / folder / "summary.md").read_text()
    for name in FIGURES:
        assert (RESULTS / folder / name).is_file(), name


def test_the_epochs_run_fits_its_data_and_records_token_dots() -> None:
    ds = xr.load_dataset(RESULTS / "lm_subliminal_epochs" / COMPACT)
    config = json.loads(ds.attrs["config"])
    fields = ("student_steps", "student_epochs", "token_dots", "trainer")
    assert [config[k] for k in fields] == [160, 20, True, "loop"]
    assert ds["token_dot_mean"].dims == ("condition", "seed", "token")
    assert {"lora", "lora_base_numbers"} <= set(ds.condition.values)
