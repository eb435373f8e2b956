"""The realistic models of issue 21 and the GPU suite, at their tiny size on the CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from gradlens_bench import suite
from gradlens_bench.agreement import verify
from gradlens_bench.methods import METHODS
from gradlens_bench.models import DEFAULT_MODELS, MODELS, REALISTIC, make_workload
from gradlens_bench.realistic import SIZE_ENV, lm_size
from gradlens_bench.results import build_dataset
from gradlens_bench.run import BenchConfig, main, parse_args
from gradlens_bench.suite import GRACE_S, Part, SuiteConfig, part_budget
from gradlens_bench.summary import realistic_markdown

STEPS = ("step_unprobed", "step_plain_trait", "step_probed", "step_probed_reused")


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIZE_ENV, "tiny")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # sdpa under vmap
@pytest.mark.parametrize("model", REALISTIC)
def test_realistic_models_pass_the_agreement_check(tiny: None, model: str) -> None:
    pytest.importorskip("peft" if model == "llama_lora" else "transformers")
    w = make_workload(model, 4, torch.device("cpu"), family="step")
    assert len(w.probe) == 1  # a quarter of the training batch
    for method in STEPS:
        found = verify(METHODS[method], make_workload(model, 4, torch.device("cpu"), family="step"))
        assert found.status == "ok", (model, method, found)


def test_the_size_follows_the_variable_then_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIZE_ENV, raising=False)
    monkeypatch.setenv("GRADLENS_BENCH_DEVICE", "cuda")
    assert lm_size("llama").tokens == 1024
    monkeypatch.setenv(SIZE_ENV, "gpu_long")
    assert (lm_size("llama").tokens, lm_size("bert").tokens) == (4096, 256)
    monkeypatch.setenv(SIZE_ENV, "huge")
    with pytest.raises(ValueError, match="GRADLENS_BENCH_SIZE='huge'"):
        lm_size("llama")


def test_the_lora_model_trains_only_its_adapters(tiny: None) -> None:
    pytest.importorskip("peft")
    model = MODELS["llama_lora"].build()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_flags_name_the_realistic_models_apart() -> None:
    assert parse_args(["--models", "realistic"])[0].models == REALISTIC
    assert not set(REALISTIC) & set(DEFAULT_MODELS)
    config = parse_args(["--size", "tiny", "--budget", "5", "--verify-batch", "2"])[0]
    assert (config.size, config.budget_s, config.verify_batch) == ("tiny", 5.0, 2)


def test_a_spent_budget_skips_every_case_and_says_so(tiny: None, tmp_path: Path) -> None:
    config = BenchConfig(
        device="cpu", out=tmp_path, models=("vit",), batch_sizes=(4,),
        methods=STEPS, budget_s=0.0, size="tiny",
    )  # fmt: skip
    ds = main(config)
    assert set(ds["status"].values.ravel()) == {"skipped"}
    assert "time budget" in str(ds["note"].values.ravel()[0])


def _dataset(times: dict[str, float]) -> object:
    records = [
        {"model": "llama", "batch": 8, "method": m, "status": "ok", "time_median": t,
         "cpu_time_median": t, "peak_memory": 2.0 * t, "repeats": 1}
        for m, t in times.items()
    ]  # fmt: skip
    return build_dataset(
        records, {}, models=["llama"], batches=[8], methods=list(times),
        attrs={"device": "cuda", "device_name": "a GPU", "realistic_size": "tiny"},
    )  # fmt: skip


def test_the_summary_reads_ratios_and_models_the_trait_every_ten_steps(tiny: None) -> None:
    ds = _dataset({"step_unprobed": 0.1, "step_plain_trait": 0.15, "step_probed": 0.2})
    table = realistic_markdown(ds)
    # probed 2x; trait 1.5x; every 10: 2 - 0.9 * 0.5 = 1.55x; probed / (+ trait) 1.33x
    assert "| llama | 8 | 100 ms | " in table
    assert "| 1.50x | 2.00x | 1.33x | 1.55x | 2.00x |" in table
    assert "GhostSuite" in table and "sequence 4096" in table
    assert "(modelled)" in table


def test_the_summary_takes_the_trait_every_ten_steps_from_measured_steps(tiny: None) -> None:
    times = {"step_unprobed": 0.1, "step_plain_trait": 0.15, "step_probed": 0.2}
    ds = _dataset(times | {"step_probed_reused": 0.13})
    table = realistic_markdown(ds)
    # every 10: (0.2 + 9 * 0.13) / 10 = 0.137 s = 1.37x, not the modelled 1.55x
    assert "| 1.50x | 2.00x | 1.33x | 1.37x | 2.00x |" in table
    assert "trait every 10 (measured)" in table and "modelled" not in table


def test_a_part_budget_passes_unused_time_on_and_shrinks_when_behind() -> None:
    # on plan: this part's share of 400 s plus nothing else
    assert part_budget(400, 0.25, 0.75, 400) == pytest.approx(100)
    # an earlier part finished early: its unused 50 s come here
    assert part_budget(350, 0.25, 0.5, 400) == pytest.approx(150)
    # behind the plan: a proportional part of what is left
    assert part_budget(100, 0.25, 0.75, 400) == pytest.approx(25)
    # never within the grace of the end
    assert part_budget(40, 1.0, 0.0, 400) == pytest.approx(40 - GRACE_S)


def test_the_suite_stops_an_overrunning_part_and_skips_what_has_no_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    parts = [
        Part("fails", (sys.executable, "-c", "raise SystemExit(3)"), 0.45, results=False),
        Part("slow", (sys.executable, "-c", "import time; time.sleep(60)"), 0.45, results=False),
        Part("late", (sys.executable, "-c", "pass"), 0.1, results=False),
    ]
    monkeypatch.setattr(suite, "plan", lambda c, out: parts)
    monkeypatch.setattr(suite, "GRACE_S", 1.0)
    monkeypatch.setattr(suite, "MIN_PART_S", 2.0)
    out = suite.main(SuiteConfig(device="cpu", budget_s=8.0, out=tmp_path))
    found = {r["part"]: r for r in json.loads((out / "suite.json").read_text())["parts"]}
    assert found["fails"]["status"] == "failed" and found["fails"]["returncode"] == 3
    assert found["slow"]["status"] == "stopped" and found["slow"]["wall_s"] < 10
    assert found["late"]["status"] == "skipped" and found["late"]["note"] == "no time left"
    assert "| slow | stopped |" in (out / "suite.md").read_text()


def test_the_plan_runs_every_mnist_condition_on_100_models() -> None:
    from subliminal_mnist import CONDITIONS

    parts = {p.name: p for p in suite.plan(SuiteConfig(), Path("/tmp/x"))}
    assert list(parts) == [
        "env",
        "realistic_lm",
        "mnist",
        "realistic_long",
        "realistic_other",
        "zoo",
        "compiled",
    ]
    mnist = parts["mnist"].command
    assert mnist[mnist.index("--models") + 1] == "100"
    assert set(CONDITIONS) <= set(mnist) and "--quick" not in mnist
    assert math.isclose(sum(p.share for p in parts.values()), 1.0)
    tiny = {p.name: p.command for p in suite.plan(SuiteConfig(tiny=True), Path("/tmp/x"))}
    assert "--quick" in tiny["mnist"] and "tiny" in tiny["realistic_lm"]
