"""The callbacks under data parallelism (2 CPU processes, gloo, by torchrun): the measured
.grad is the all-reduced one, so every rank's records equal probed_step on all ranks'
micro-batches of each step, in float64, and only rank 0 writes the run file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradlens import open_run
from gradlens.transforms import named_chain, remove_aligned
from tests.integrations.replay import assert_file_matches, assert_rows_match, net, replay

ROOT = Path(__file__).resolve().parents[2]
N, STEPS, ACCUMULATE = 32, 3, 2  # 16 examples a rank: 4 micro-batches of 4, 2 steps an epoch


def BEFORE() -> object:  # noqa: N802 - a constant the worker shares
    return named_chain(("remove", remove_aligned()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_two_ranks_measure_the_all_reduced_gradient(tmp_path: Path, framework: str) -> None:
    pytest.importorskip("transformers" if framework == "hf" else "lightning")  # dev extra
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(ROOT / "tests/integrations/ddp_worker.py"),
        framework, str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"{framework}{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert not torch.equal(ranks[0]["batches"][0][0], ranks[1]["batches"][0][0])  # two shards
    # each step: rank 0's micro-batches, then rank 1's (equal sizes: the order of the mean
    # does not matter, and DDP's all-reduce averages the ranks' means)
    steps = [
        [b for r in ranks for b in r["batches"][k * ACCUMULATE : (k + 1) * ACCUMULATE]]
        for k in range(STEPS)
    ]
    start = net()
    want = replay(start, steps, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), BEFORE())
    for r in ranks:
        checked = assert_rows_match(r["rows"], want, examples=False)
        assert {"cosine", "layer_cosine", "update_cosine", "transform_coef"} <= set(checked)
        for name, p in start.named_parameters():
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=1e-12, atol=1e-14)
    with open_run(tmp_path / f"{framework}.nc") as run:
        assert_file_matches(run, want, examples=False)
    assert [p.name for p in tmp_path.glob("*.nc")] == [f"{framework}.nc"]
    for r in ranks:  # the per-example pass is refused on every rank, naming the cause
        assert "all-reduced over 2 processes" in r["refused"], r["refused"]
