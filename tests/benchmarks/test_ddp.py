"""The DDP entry: checked, timed over two processes, rendered; its committed first run reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from gradlens_bench.agreement import TOLERANCE, same_update
from gradlens_bench.measure import Protocol
from gradlens_bench.methods import DEFAULT_METHODS, METHODS
from gradlens_bench.models import DDP, make_workload
from gradlens_bench.overhead import overhead_markdown
from gradlens_bench.world import measure_world
from tests.benchmarks._cli import ROOT, run

COMMITTED = ROOT / "benchmarks" / "results" / "ddp-cpu-2proc"
DDP_METHODS = [name for name, m in METHODS.items() if m.family == "ddp"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run("benchmarks/gradlens_bench/run.py", "--smoke", "--models", "ddp", "--out", str(out))
    return out


def test_the_ddp_models_are_checked_and_timed_over_two_processes(smoke: Path) -> None:
    with xr.open_dataset(smoke / "results.nc") as ds:
        ds = ds.load()
    assert list(ds["model"].values) == list(DDP) and ds.attrs["ddp_world_size"] == 2
    for model in DDP:
        for name in DEFAULT_METHODS:
            method = METHODS[name]
            at = ds.sel({"model": model, "method": name})
            if method.family != "ddp":
                assert set(at["status"].values.tolist()) == {"not applicable"}
                continue
            assert str(at["agreement_status"].item()) == "ok", (model, name)
            assert set(at["status"].values.tolist()) == {"ok"}, (model, name)
            assert (at["time_median"] > 0).all() and (at["repeats"] == 2).all()
        base = ds.sel({"model": model, "method": "ddp_plain"})
        assert (base["time_ratio"].values == 1.0).all()
    table = (smoke / "table.md").read_text()
    assert "DDP models: 2 processes (gloo)" in table and "| probed DDP step (h) |" in table
    assert "Peak memory" not in table  # not measured: the methods share their processes


@pytest.mark.parametrize("model", DDP)
def test_the_ddp_check_tells_a_projected_update_from_a_plain_one(model: str) -> None:
    w = make_workload(model, 4, torch.device("cpu"), family="ddp")
    assert same_update()(METHODS["ddp_plain"], w) <= TOLERANCE
    assert same_update(project=True)(METHODS["ddp_probed_remove"], w) <= TOLERANCE
    assert same_update(project=True)(METHODS["ddp_plain"], w) > 100 * TOLERANCE
    assert same_update()(METHODS["ddp_probed_remove"], w) > 100 * TOLERANCE


def test_ranks_share_the_model_and_trait_batch_but_not_the_training_batch() -> None:
    cpu = torch.device("cpu")
    zero, one = (make_workload("ddp_transformer", 4, cpu, family="ddp", rank=r) for r in (0, 1))
    for a, b in zip(zero.student.parameters(), one.student.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(zero.probe, one.probe) and not torch.equal(zero.noise, one.noise)


def test_a_failing_rank_gives_a_note_not_a_hang() -> None:
    protocol = Protocol(threads=1, steps=1, blocks=1)
    found = measure_world("no_such_model", 4, ["ddp_plain"], protocol, 2, timeout_s=120)
    assert [r["status"] for r in found] == ["error"]
    assert "no_such_model" in str(found[0]["note"])


def test_the_committed_first_run_renders_its_table(tmp_path: Path) -> None:
    shutil.copy(COMMITTED / "overhead.json", tmp_path / "overhead.json")
    run("benchmarks/gradlens_bench/run.py", "--render", str(tmp_path / "overhead.json"))
    assert (tmp_path / "overhead.md").read_text() == (COMMITTED / "overhead.md").read_text()


def test_the_docs_quote_the_committed_first_run() -> None:
    found = json.loads((COMMITTED / "overhead.json").read_text())
    assert overhead_markdown(found) == (COMMITTED / "overhead.md").read_text()
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    for name, label in (("mlp", "MLP 784-256-256-10"), ("transformer", "tiny transformer")):
        w = found["workloads"][name]
        m, r = w["median_ms"], w["ratio_to_plain"]
        # The median of 7 blocks is one block's time: recompute it from them.
        assert m["plain"] == pytest.approx(1e3 * np.median(w["seconds_per_step"]["plain"]))
        cells = [f"{w['parameters']:,}", f"{m['plain']:.2f}"]
        cells += [f"{r[k]:.2f}" for k in ("probed", "probed_lean", "probed_remove")]
        assert any(
            line.startswith(f"| {label}") and line.endswith(" | ".join(["", *cells, ""]).strip())
            for line in scaling.splitlines()
        ), (name, cells)
