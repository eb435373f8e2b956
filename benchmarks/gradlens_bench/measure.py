"""Time and peak memory of one (model, batch, method) case, in a fresh process.

Each case runs in its own child process, forked from a ``forkserver`` that has
already imported torch, gradlens and the optional libraries
(:mod:`gradlens_bench.preload`), so a case costs no import time yet inherits no
memory, caches or threads from another case.

Time: :class:`torch.utils.benchmark.Timer` (``adaptive_autorange``), which
synchronises the accelerator before each clock read and runs with
``num_threads`` intra-op threads. After one warm-up call it times blocks of
calls, each long enough that the timer's overhead is negligible: at least 4
blocks and ``min_time_s``, then until the inter-quartile range is within 10%
of the median or ``max_time_s`` has passed (stretched to 3 calls for slow
calls). The median and quartiles are over blocks, per call. On CPU the
process CPU time (all threads, user + system) of each block but the first is
read too, per call.

Peak memory is the increase over what the process held after setup, including
the method's result: ``peak_memory`` from torch's allocator during one extra,
untimed call (:func:`allocator_peak`), and on CPU ``peak_rss``, the
resident-set high-water mark over the timed calls (:class:`PeakRSS`).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from itertools import pairwise
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

__all__ = [
    "Case",
    "PeakRSS",
    "Protocol",
    "allocator_peak",
    "configure",
    "forkserver",
    "run_isolated",
    "sync",
]


@dataclass(frozen=True)
class Case:
    """One measurement: a model, a batch size and a method, by registry name."""

    model: str
    batch: int
    method: str


@dataclass(frozen=True)
class Protocol:
    """How a case is measured; see the module docstring.

    ``steps`` and ``blocks`` are the DDP methods' protocol
    (:mod:`gradlens_bench.world`): steps per timed block and timed blocks per method.
    """

    device: str = "cpu"
    threads: int | None = None
    min_time_s: float = 1.0
    max_time_s: float = 4.0
    threshold: float = 0.1
    slow_calls: int = 3
    steps: int = 5
    blocks: int = 7


def configure(device: torch.device, threads: int | None) -> None:
    """Set the intra-op threads and switch TF32 off, in every process that computes.

    On CUDA, cuDNN convolutions and (with some settings) matmuls run in TF32 by
    default, about 1e-3 relative error: the agreement check would fail and the
    methods would not be compared at float32. Setting the flags does not
    initialise CUDA.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    del device


def sync(device: torch.device) -> None:
    """Wait for queued device work; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


class PeakRSS:
    """Peak resident-set increase over a block of code, in bytes.

    Linux: ``VmHWM`` after resetting it to ``VmRSS`` by writing ``5`` to
    ``/proc/self/clear_refs``, minus ``VmRSS`` then. It sees every allocation,
    but also allocator caching and page granularity. Elsewhere ``ru_maxrss``,
    an upper bound.
    """

    def __init__(self) -> None:
        self.how = "ru_maxrss"
        self._base = 0

    def start(self) -> None:
        """Take the baseline and reset the high-water mark."""
        gc.collect()
        try:
            _CLEAR_REFS.write_text("5")
            self._base = _status_kib("VmRSS") * 1024
            self.how = "rss_hwm_reset"
        except OSError:
            self._base = 0

    def stop(self) -> int:
        """Bytes above the baseline at the highest point since :meth:`start`."""
        if self.how == "rss_hwm_reset":
            return max(_status_kib("VmHWM") * 1024 - self._base, 0)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: kineto logs profiler start and stop there."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def allocator_peak(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes held by torch's allocator during one call, above the level before it.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the
    call runs under ``torch.profiler`` with ``profile_memory=True`` and the
    peak is the maximum running sum of its allocation and free events. The
    call's result is dropped inside the window, so its frees count.
    """
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def _time(run: Callable[[], object], device: torch.device, p: Protocol) -> dict[str, float]:
    """Wall-clock and process CPU seconds per call, by :class:`Timer`, after one warm-up call."""
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    first = time.perf_counter() - start
    max_run = max(p.max_time_s, p.slow_calls * first)
    threads = p.threads or torch.get_num_threads()
    timer = Timer("run()", globals={"run": run}, num_threads=threads)
    cpu_marks: list[float] = []
    measured = timer.adaptive_autorange(
        p.threshold,
        min_run_time=p.min_time_s,
        max_run_time=max_run,
        callback=lambda _n, _t: cpu_marks.append(time.process_time()),
    )
    n = measured.number_per_run
    cpu = [(b - a) / n for a, b in pairwise(cpu_marks)]
    return {
        "time_median": measured.median,
        "time_q25": float(torch.tensor(measured.times).quantile(0.25)),
        "time_q75": float(torch.tensor(measured.times).quantile(0.75)),
        "cpu_time_median": statistics.median(cpu) if cpu and device.type == "cpu" else float("nan"),
        "repeats": n * len(measured.times),
    }


def measure_case(case: Case, protocol: Protocol) -> dict[str, object]:
    """Set up ``case``, then measure time and peak memory; run in a fresh process.

    Returns:
        A flat record: the case, ``status="ok"``, ``time_median``/``time_q25``/
        ``time_q75`` in seconds per call, ``cpu_time_median`` (NaN on CUDA),
        ``repeats`` (timed calls), ``peak_memory`` and ``peak_rss`` in bytes.
    """
    from gradlens_bench.methods import METHODS
    from gradlens_bench.models import make_workload

    device = torch.device(protocol.device)
    configure(device, protocol.threads)
    method = METHODS[case.method]
    with method.prepare(make_workload(case.model, 2, device, family=method.family)) as run:
        run()  # one-time initialisation (lazy imports, first dispatch) stays out of the numbers
    del run
    workload = make_workload(case.model, case.batch, device, family=method.family)
    with method.prepare(workload) as run:
        rss = PeakRSS()
        rss.start()
        timing = _time(run, device, protocol)
        peak_rss = rss.stop()
        gc.collect()
        peak = allocator_peak(run, device)
    return {
        **asdict(case),
        "status": "ok",
        "note": "",
        **timing,
        "peak_memory": peak,
        "peak_rss": peak_rss if device.type == "cpu" else float("nan"),
        "rss_measure": rss.how,
    }


def _child(conn: Connection, case: Case, protocol: Protocol) -> None:
    try:
        conn.send(measure_case(case, protocol))
    except BaseException as err:  # report every failure back instead of dying silently
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        conn.send({**asdict(case), "status": "error", "note": last})
    finally:
        conn.close()


_PRELOAD = [
    "torch",
    "torch._dynamo",
    "gradlens",
    "opacus",
    "backpack",
    "torchvision.models.resnet",
    "transformers.models.gpt2.modeling_gpt2",
    "gradlens_bench.preload",
]
"""Modules the forkserver imports once (``torch._dynamo``: the first torch.func call's 1 s;
GPT-2's modules: several seconds). None asks the CUDA driver for its devices on import."""


def _importable(module: str) -> bool:
    """Whether ``module`` can be found (a submodule's parent packages are imported to look)."""
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def forkserver(device: str) -> ForkServerContext:
    """The ``forkserver`` context every measured process is forked from, its preload set."""
    # Read by the forkserver's preload, which must not touch CUDA before forking.
    os.environ["GRADLENS_BENCH_DEVICE"] = device
    # Importing torch.utils.benchmark imports torch.utils.cpp_extension, which calls
    # torch.cuda.is_available(); its default check initialises the CUDA driver and so
    # poisons every fork ("Cannot re-initialize CUDA in forked subprocess"). NVML's check
    # does not (seen on an H100, 2026-11-23).
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in _PRELOAD if _importable(m)])
    return ctx


def run_isolated(case: Case, protocol: Protocol, timeout_s: float = 600.0) -> dict[str, object]:
    """Measure ``case`` in a fresh child process and return its record.

    A child that dies (for example killed for memory) or runs past
    ``timeout_s`` gives a record with ``status="failed"`` and a note.
    """
    ctx = forkserver(protocol.device)
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, case, protocol), daemon=True)
    process.start()
    send.close()
    record: dict[str, object] | None = None
    try:
        if receive.poll(timeout_s):
            record = receive.recv()
    except EOFError:
        record = None
    finally:
        receive.close()
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
    if record is None:
        why = f"timed out after {timeout_s:.0f} s" if process.exitcode in (None, -9) else ""
        note = why or f"worker exited with code {process.exitcode} (out of memory?)"
        record = {**asdict(case), "status": "failed", "note": note}
    return record
