"""The probe benchmark runs end to end (``--smoke``) and checks its methods first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from benchmarks.bench_probes import main, parse_args
from benchmarks.cases import METHODS, missing_requirement
from benchmarks.measure import allocator_peak
from benchmarks.models import MODELS

# Where a library refuses a model, the benchmark says so instead of timing it.
EXPECTED_UNSUPPORTED = {("cnn", "dots_ghost")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    main(parse_args(["--smoke", "--device", "cpu", "--out", str(out)]))
    assert torch.get_num_threads() == threads, "the smoke run (1 thread) restores torch's setting"
    return out


@pytest.fixture(scope="module")
def results(smoke: Path) -> xr.Dataset:
    with xr.open_dataset(smoke / "results.nc") as ds:
        return ds.load()


def test_writes_results_table_and_plot(smoke: Path) -> None:
    for name in ("results.nc", "table.md", "probes.png"):
        assert (smoke / name).stat().st_size > 0, name


def test_results_cover_every_model_and_method(results: xr.Dataset) -> None:
    assert list(results["model"].values) == list(MODELS)
    assert list(results["method"].values) == list(METHODS)
    assert results["method"].values[0] == "plain"
    for key in ("device_name", "torch_version", "gradlens_version", "git_commit", "config"):
        assert results.attrs[key], key


def test_every_method_agrees_with_the_autograd_loop(results: xr.Dataset) -> None:
    for model in results["model"].values:
        for method in results["method"].values:
            status = results["agreement_status"].sel({"model": model, "method": method}).item()
            if (model, method) in EXPECTED_UNSUPPORTED:
                assert status == "unsupported"
            elif missing_requirement(METHODS[method]) is not None:
                assert status == "missing"
            else:
                assert status == "ok", (model, method, status)


def test_measured_cases_have_finite_positive_numbers(results: xr.Dataset) -> None:
    measured = results["status"] == "ok"
    agreed = results["agreement_status"] == "ok"
    assert bool((measured == agreed).all()), "every agreeing method is measured, no other"
    for var in ("time_median", "time_q25", "time_q75", "time_ratio"):
        values = results[var].where(measured).values
        ok = values[measured.values]
        assert np.isfinite(ok).all() and (ok > 0).all(), var
    memory = results["peak_memory"].values[measured.values]
    assert np.isfinite(memory).all() and (memory >= 0).all()
    plain = results["time_ratio"].sel({"method": "plain"}).values
    np.testing.assert_allclose(plain, 1.0)


def test_table_names_every_model_and_method(smoke: Path) -> None:
    table = (smoke / "table.md").read_text()
    for model in MODELS:
        assert f"### {model}:" in table
    for method in METHODS.values():
        assert f"| {method.label} |" in table


def test_allocator_peak_sees_a_known_allocation() -> None:
    size = 8 * 2**20

    def run() -> float:
        return float(torch.ones(size // 4).sum())

    assert allocator_peak(run, torch.device("cpu")) >= size


def test_flags_map_onto_the_config() -> None:
    config = parse_args(["--models", "mlp,tokens", "--batch-sizes", "8,32", "--threads", "1"])
    assert config.models == ("mlp", "tokens")
    assert config.batch_sizes == (8, 32)
    assert config.protocol.threads == 1
    with pytest.raises(SystemExit):
        parse_args(["--methods", "plain,nonsense"])
    assert math.isfinite(config.timeout_s)


def test_step_benchmark_smoke_checks_updates_and_writes_its_table(tmp_path: Path) -> None:
    from benchmarks import bench_step

    out = bench_step.main(bench_step.parse(["--smoke", "--out", str(tmp_path)]))
    result = json.loads((out / "step.json").read_text())
    steps = {row["step"] for row in result["rows"]}
    assert steps == {
        "unprobed step",
        "probed step",
        "probed step, no measured change",
        "probed step + remove_aligned",
    }
    assert all(row["median_s"] > 0 and row["update_agreement"] < 1e-4 for row in result["rows"])
    assert "probed step" in (out / "step.md").read_text()
