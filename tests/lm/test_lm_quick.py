"""Integration: the experiment end to end on a tiny config (the records' structure)."""

import dataclasses
from pathlib import Path

import lm_subliminal
import numpy as np
import pytest
import torch
import xarray as xr

from subliminal_lm import COMBINED, COMPACT, DEFAULT_CONDITIONS, main, summary_markdown
from subliminal_lm.run import _seed_done

from .test_lm_setting import tiny_config

SEEDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[xr.Dataset, Path]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lm")
    path = main(tiny_config(seeds=SEEDS, out=out, jobs=2))  # each seed in its own process
    assert path == out / COMBINED
    return xr.load_dataset(path), out


def test_run_file_structure(run: tuple[xr.Dataset, Path]) -> None:
    ds, out = run
    config = tiny_config()
    steps = config.student_steps
    assert list(ds.condition.values) == list(DEFAULT_CONDITIONS)
    assert list(ds.seed.values) == list(range(SEEDS))
    assert ds.sizes["step"] == steps + 1 and ds.sizes["example"] == config.student_batch
    assert ds["trait_prob"].dims == ("condition", "seed", "step")
    assert ds["layer_cosine"].dims == ("condition", "seed", "step", "layer")
    assert ds["example_cosine"].dims == ("condition", "seed", "example_step", "example")
    assert ds["teacher_trait_prob"].dims == ("seed",)
    assert "model.layers.0.mlp.up_proj" in ds.layer.values
    for name, var in ds.data_vars.items():
        assert "long_name" in var.attrs, name
    assert np.isfinite(ds["trait_prob"]).all()
    trained = ds.isel(step=slice(0, steps))
    for name in ("cosine", "update_cosine", "teacher_cosine", "drift_cosine", "drift_norm"):
        assert np.isfinite(trained[name]).all(), name
        assert np.isnan(ds[name].isel(step=steps)).all(), name  # the last row: trait_prob only
    assert np.isfinite(ds["example_cosine"]).all()
    assert (out / "summary.md").is_file() and (out / "trait_prob.png").is_file()
    assert "config" in ds.attrs


def test_each_student_starts_from_its_base(run: tuple[xr.Dataset, Path]) -> None:
    ds, _ = run
    start = ds["trait_prob"].isel(step=0)
    for condition in ds.condition.values:
        expected = ds["other_trait_prob" if condition == "cross_init" else "base_trait_prob"]
        np.testing.assert_allclose(start.sel(condition=condition), expected, rtol=1e-5)


def test_only_remove_update_acts_and_its_update_is_orthogonal_to_the_trait(
    run: tuple[xr.Dataset, Path],
) -> None:
    ds, _ = run
    trained = ds.isel(step=slice(0, tiny_config().student_steps))
    coef = trained["transform_coef"].sel(placement="after", transform="remove_update", group="all")
    assert np.isfinite(coef.sel(condition="remove_update")).all()
    assert np.isnan(coef.drop_sel(condition="remove_update")).all()
    removed = trained["update_cosine"].sel(condition="remove_update")
    kept = trained["update_cosine"].sel(condition="same_init")
    assert float(np.abs(removed).max()) < 1e-3 * float(np.abs(kept).max()) + 1e-6


def test_the_script_maps_its_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = lm_subliminal.parse(["--quick", "--seeds", "4", "--out", str(tmp_path)])
    assert config.seeds == 4 and config.out == tmp_path and config.student_steps == 30
    assert lm_subliminal.parse(["--jobs", "2"]).jobs == 2
    assert lm_subliminal.parse(["--conditions", "sgd", "same_init"]).conditions == (
        "sgd",
        "same_init",
    )
    with pytest.raises(SystemExit):
        lm_subliminal.parse(["--seeds", "1"])
    assert "--seeds must be at least 2 (intervals are over seeds)." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lm_subliminal.parse(["--jobs", "0"])
    assert "--jobs must be at least 1." in capsys.readouterr().err


def test_a_seed_is_reused_only_with_the_same_settings(
    run: tuple[xr.Dataset, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = run
    config = tiny_config(seeds=SEEDS, out=out)
    names = list(DEFAULT_CONDITIONS)
    assert _seed_done(config, names, 0)
    assert not _seed_done(dataclasses.replace(config, lr=2 * config.lr), names, 0)
    assert not _seed_done(dataclasses.replace(config, lr=3 * config.lr, progress=True), names, 0)
    printed = capsys.readouterr().out
    assert printed.startswith(f"seed 0: the parts in {out}")
    assert "were made with other settings; running it again" in printed
    assert not _seed_done(config, names, SEEDS)  # never run


def test_the_compact_file_gives_the_same_summary(run: tuple[xr.Dataset, Path]) -> None:
    ds, out = run
    small = xr.load_dataset(out / COMPACT)
    assert "example_cosine" not in small and small["layer_cosine_mean"].dims[-1] == "layer"
    assert np.isfinite(small["remove_coef"].sel(condition="remove_update").isel(step=0)).all()
    assert summary_markdown(small) == summary_markdown(ds)
    assert summary_markdown(ds) == (out / "summary.md").read_text()
