"""Integration: the experiment script's --quick run on real MNIST."""

import os
from pathlib import Path

import mnist_aux
import numpy as np
import pytest
import xarray as xr

from subliminal_mnist import compact_results, final_values, headline_table, summary_markdown
from subliminal_mnist.data import DATA_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> str:
    root = os.environ.get(DATA_DIR_ENV) or str(ROOT.parent / "shared" / "data")
    if not Path(root, "MNIST", "raw").is_dir():
        pytest.fail(f"MNIST not found under {root}: set {DATA_DIR_ENV} (see README).")
    return root


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    out = tmp_path_factory.mktemp("quick")
    config = mnist_aux.parse(
        ["--quick", "--out", str(out), "--data-dir", data_dir(), "--device", "cpu", "--no-progress"]
    )
    path = mnist_aux.main(config)
    assert (out / "summary.md").is_file()
    assert len(list((out / "figures").glob("*.png"))) == 10
    return xr.load_dataset(path)


def test_quick_run_file_structure(quick_run: xr.Dataset) -> None:
    ds = quick_run
    assert list(ds.condition.values) == ["aux", "all_logits", "cross_init"]
    assert list(ds.model.values) == [0, 1, 2] and list(ds.seed.values) == [0, 0, 0]
    assert ds.sizes["step"] == 40 and ds.sizes["layer"] == 3 and ds.sizes["example"] == 1024
    assert ds["cosine"].dims == ("step", "model", "condition")
    assert ds["layer_cosine"].dims == ("step", "model", "layer", "condition")
    assert ds["example_cosine"].dims == ("example_step", "example_model", "example", "condition")
    assert list(ds.example_model.values) == [0, 1]
    assert ds["teacher_accuracy"].dims == ("model",)
    for name, var in ds.data_vars.items():
        assert "long_name" in var.attrs and "units" in var.attrs, name
    assert np.isfinite(ds["cosine"]).all()
    for name in ("test_accuracy", "test_loss", "test_entropy", "test_majority"):
        assert np.isfinite(ds[name].isel(step=-1)).all(), name
    held = ds["heldout_update_cosine"]
    assert np.isfinite(held.isel(step=0)).all() and np.isnan(held.isel(step=1)).all()
    for key in ("config", "gradlens_version", "torch_version", "created_at", "device"):
        assert key in ds.attrs


def test_the_compact_file_gives_the_full_files_table_and_final_values(
    quick_run: xr.Dataset,
) -> None:
    compact = compact_results(quick_run.load())
    assert compact.nbytes < quick_run.nbytes / 4
    xr.testing.assert_identical(headline_table(compact), headline_table(quick_run))
    xr.testing.assert_identical(final_values(compact), final_values(quick_run))
    kwargs = {"wall_time_s": 1.0, "device": "cpu", "command": "c"}
    assert summary_markdown(compact, **kwargs) == summary_markdown(quick_run, **kwargs)
    for name in ("trait_norm", "train_norm", "cosine"):
        xr.testing.assert_equal(compact[name], quick_run[name])


def test_quick_run_teacher_beats_chance_and_all_logits_learns(quick_run: xr.Dataset) -> None:
    assert float(quick_run["teacher_accuracy"].min()) > 0.7
    final = quick_run["test_accuracy"].isel(step=-1)
    assert float(final.sel(condition="all_logits").mean()) > 0.3


def test_interventions_quick_run_writes_transform_records(tmp_path: Path) -> None:
    conditions = [
        "remove",
        "reverse",
        "remove_layer",
        "remove_per_example",
        "remove_update",
        "liminal_early",
        "remove_shuffled",
        "liminal",
        "remove_random",
    ]
    config = mnist_aux.parse(
        [
            "--quick",
            "--models",
            "2",
            "--out",
            str(tmp_path),
            "--data-dir",
            data_dir(),
            "--device",
            "cpu",
            "--no-progress",
            "--conditions",
            *conditions,
        ]
    )
    ds = xr.load_dataset(mnist_aux.main(config))
    assert list(ds.condition.values) == conditions
    cos = ds["transform_cosine"]
    assert cos.dims[:6] == ("step", "model", "placement", "transform", "stage", "group")
    out = cos.sel(placement="before", stage="after")
    assert float(abs(out.sel(condition="remove", transform="remove", group="all")).max()) < 1e-4
    assert float(abs(ds["update_cosine"].sel(condition="remove_update")).max()) < 1e-4
    per_layer = out.sel(condition="remove_layer", transform="remove_layer").drop_sel(group="all")
    assert per_layer.sizes["group"] == 3 and float(abs(per_layer).max()) < 1e-4
    assert np.isnan(out.sel(condition="remove", transform="remove").drop_sel(group="all")).all()
    assert np.isnan(out.sel(condition="remove", transform="reverse")).all()
    after = cos.sel(placement="after", condition="remove_update", transform="remove_update")
    assert float(abs(after.sel(stage="after", group="all")).max()) < 1e-4
    weight = ds["liminal_weight"].sel(condition="liminal_early")
    assert float(weight.isel(step=0)) == 1.0 and float(weight.isel(step=-1)) == 0.0
    assert np.isnan(ds["liminal_weight"].sel(condition="remove")).all()
    # published liminal: lambda_0 = 1 -> 1 over the first epoch (20 steps here), then -> 0
    published = ds["liminal_weight"].sel(condition="liminal")
    assert float(published.isel(step=0)) == 1.0 and float(published.isel(step=20)) == 1.0
    assert 0 < float(published.isel(step=-1)) < 0.1
    reverse = ds["transform_coef"].sel(
        condition="reverse", transform="reverse", placement="before", group="all"
    )
    assert np.isfinite(reverse).all()
    # the control removes a shuffled-label direction: the true trait gradient stays in g_d
    shuffled = out.sel(condition="remove_shuffled", transform="remove_shuffled", group="all")
    assert float(abs(shuffled).max()) < 1e-4  # orthogonal to what it removed ...
    applied = ds["applied_cosine"].sel(condition="remove_shuffled")
    assert float(abs(applied).max()) > 1e-3  # ... but not to g_t


def test_flags_map_onto_the_config() -> None:
    config = mnist_aux.parse(
        [
            "--seeds",
            "3",
            "--models",
            "7",
            "--noise",
            "fresh",
            "--conditions",
            "aux",
            "liminal_early",
            "--trait",
            "kl",
            "--liminal-lambda0",
            "10",
            "--sgd-lr",
            "2.5",
            "--device",
            "cpu",
            "--out",
            "x",
        ]
    )
    assert config.seeds == 3 and config.conditions == ("aux", "liminal_early")
    assert config.models == 7 and config.student.noise == "fresh"
    assert config.student.trait == "kl" and config.student.liminal_lambda0 == 10.0
    assert config.student.sgd_lr == 2.5
    assert config.device == "cpu" and str(config.out) == "x"
    defaults = mnist_aux.parse([])
    assert defaults.seeds == 1 and defaults.models == 10 and defaults.student.epochs == 5
    assert defaults.student.noise == "fixed" and defaults.student.noise_per_epoch == 60_000
    assert defaults.student.sgd_lr == 0.1
    assert defaults.conditions == ("aux", "all_logits", "cross_init")
    with pytest.raises(SystemExit):
        mnist_aux.parse(["--conditions", "bogus"])
