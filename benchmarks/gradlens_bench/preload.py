"""Imported once by the benchmark's forkserver, never by user code.

Besides the imports (also those of the entry point, which every case re-runs
as ``__mp_main__``), for CPU runs it imports ``torch.utils.benchmark`` and runs
the CPU profiler once on a tiny tensor: its first use costs over a second of
lazy initialisation, which every case would pay otherwise. Not for CUDA runs
(``GRADLENS_BENCH_DEVICE``, set by :func:`gradlens_bench.measure.run_isolated`):
both ask the CUDA driver for its devices (the import through
``torch.utils.cpp_extension``), and a driver initialised before ``fork`` fails
in every child ("CUDA error: initialization error", or "Cannot re-initialize
CUDA in forked subprocess"; both seen on an H100). The op is too small to start
torch's OpenMP threads, so forking afterwards is safe. Last, ``gc.freeze()``
moves every object created so far out of the collector's reach, as the ``gc``
docs advise before forking: a case's ``gc.collect()`` then takes milliseconds
instead of a tenth of a second, and does not copy the parent's pages.
"""

from __future__ import annotations

import atexit
import gc
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # this process and its cases only

import importlib

import torch
import tqdm  # noqa: F401 - and the rest: what the entry point, re-run as __mp_main__, imports
from torch.profiler import ProfilerActivity, profile

import gradlens_bench.methods
import gradlens_bench.render  # noqa: F401 - matplotlib and xarray

if not os.environ.get("GRADLENS_BENCH_DEVICE", "cpu").startswith("cuda"):
    # Not before a CUDA run's fork: importing it imports torch.utils.cpp_extension, which
    # calls torch.cuda.is_available() and so initialises the CUDA driver.
    importlib.import_module("torch.utils.benchmark")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as _prof:
        torch.ones(2).add(1)

gc.freeze()
atexit.register(gc.unfreeze)  # let shutdown free them, or nanobind reports leaks
