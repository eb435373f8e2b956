"""Run a benchmark entry point in a subprocess, as a module or as a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def env(module: bool) -> dict[str, str]:
    """The environment of a subprocess: ``-m gradlens_bench.x`` needs ``benchmarks/`` on the path.

    A file run (``benchmarks/gradlens_bench/x.py``) must find its package by itself.
    """
    found = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return found | {"PYTHONPATH": str(BENCH)} if module else found


def run(*args: str, cwd: Path = ROOT) -> str:
    """Run ``python *args`` from the repository root; its stdout, or a failure with its stderr."""
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env(args[0] == "-m"), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
