"""Time and peak memory of one (model, batch, method) case, in a fresh process.

Each case runs in its own child process, forked from a ``forkserver`` that has
already imported torch, gradlens and the optional libraries, so a case costs
no import time yet inherits no memory, caches or threads from another case.

Timing: the device is synchronised before every clock read; on CUDA the
interval is taken with CUDA events. After ``warmup`` calls, the number of
timed calls is chosen so that they take about ``min_time_s`` in all, within
``[min_repeats, max_repeats]``, but calls so slow that ``min_repeats`` of them
would pass ``max_time_s`` are timed only as often as fits, and at least 3
times. We report the median and the inter-quartile range.

Peak memory is the increase over what the process held after setup (model,
batch, reference gradient and the method's own wrapping), including the
method's result. Two numbers:

- ``peak_memory``, tensor bytes from torch's allocator during one extra,
  untimed call. CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``torch.cuda.memory_allocated()`` before
  the call. CPU: the call runs under ``torch.profiler`` with
  ``profile_memory=True``, and the peak is the maximum running sum of the
  allocation and free events it records (the CPU counterpart of
  ``max_memory_allocated``). Memory that libraries allocate outside torch's
  allocator (for example oneDNN scratch space) is not seen.
- ``peak_rss`` (CPU, Linux), over the warm-up and timed calls: the process's
  resident-set high-water mark ``VmHWM``, reset to the current resident set by
  writing ``5`` to ``/proc/self/clear_refs`` after setup, minus ``VmRSS`` then.
  It sees every allocation, but also allocator caching: glibc keeps some
  freed blocks and reuses them, so it is page-granular (4 KiB) and noisy below
  a few MiB. Elsewhere ``ru_maxrss`` is used, an upper bound.

One-time costs are kept out of both numbers: the forkserver preloads the
modules that the first call would import, and each case first runs its method
once on 2 examples, before the baseline is taken.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["Case", "PeakRSS", "Protocol", "allocator_peak", "measure_case", "run_isolated", "sync"]


@dataclass(frozen=True)
class Case:
    """One measurement: a model, a batch size and a method, by registry name."""

    model: str
    batch: int
    method: str


@dataclass(frozen=True)
class Protocol:
    """How a case is measured."""

    device: str = "cpu"
    warmup: int = 1
    min_repeats: int = 5
    max_repeats: int = 30
    min_time_s: float = 1.0
    max_time_s: float = 8.0
    chunk_size: int = 128
    threads: int | None = None


_SLOW_REPEATS = 3
"""Fewest timed calls of a case, however slow."""


def sync(device: torch.device) -> None:
    """Wait for queued device work; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock seconds for one call, and process CPU seconds (NaN on CUDA).

    The result of ``run`` is dropped after the clock stops.
    """
    sync(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, float("nan")
    start_cpu, start_s = time.process_time(), time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start_s, time.process_time() - start_cpu


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


class PeakRSS:
    """Peak resident-set increase over a block of code, in bytes; see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.how = ""
        self._base = 0

    def start(self) -> None:
        """Take the baseline and reset the high-water mark."""
        gc.collect()
        sync(self.device)
        try:
            _CLEAR_REFS.write_text("5")
            self._base = _status_kib("VmRSS") * 1024
            self.how = "rss_hwm_reset"
        except OSError:
            self._base = _current_rss_bytes()
            self.how = "ru_maxrss"

    def stop(self) -> int:
        """Bytes above the baseline at the highest point since :meth:`start`."""
        sync(self.device)
        if self.how == "rss_hwm_reset":
            peak = _status_kib("VmHWM") * 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return max(peak - self._base, 0)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: kineto logs profiler start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def allocator_peak(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes held by torch's allocator during one call, above the level before it.

    The call's result is dropped inside the measured window, so its frees count.
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


def _current_rss_bytes() -> int:
    try:
        return _status_kib("VmRSS") * 1024
    except OSError:
        return 0


def _quantile(values: Sequence[float], q: float) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=4, method="inclusive")[int(q * 4) - 1]


def measure_case(case: Case, protocol: Protocol) -> dict[str, object]:
    """Set up ``case``, then measure time and peak memory; run in a fresh process.

    Returns:
        A flat record: the case, ``status="ok"``, ``time_median``/``time_q25``/
        ``time_q75`` in seconds, ``cpu_time_median`` (process CPU seconds, all
        threads; NaN on CUDA), ``repeats``, ``peak_memory`` and ``peak_rss`` in
        bytes, and ``rss_measure`` naming how the resident set was read.
    """
    from benchmarks.cases import METHODS, Options
    from benchmarks.models import make_workload

    if protocol.threads is not None:
        torch.set_num_threads(protocol.threads)
    device = torch.device(protocol.device)
    workload = make_workload(case.model, case.batch, device)
    method = METHODS[case.method]
    options = Options(chunk_size=protocol.chunk_size)
    tiny = dataclasses.replace(workload, inputs=workload.inputs[:2], targets=workload.targets[:2])
    with method.prepare(tiny, options) as run:
        run()  # one-time initialisation (lazy imports, first dispatch) stays out of the numbers
    del run
    with method.prepare(workload, options) as run:
        rss = PeakRSS(device)
        rss.start()
        first, _ = _timed(run, device)
        for _ in range(protocol.warmup - 1):
            first, _ = _timed(run, device)
        first = max(first, 1e-9)
        repeats = min(
            max(math.ceil(protocol.min_time_s / first), protocol.min_repeats), protocol.max_repeats
        )
        repeats = min(repeats, max(_SLOW_REPEATS, math.floor(protocol.max_time_s / first)))
        times, cpu_times = zip(*(_timed(run, device) for _ in range(repeats)), strict=True)
        peak_rss = rss.stop()
        gc.collect()
        peak = allocator_peak(run, device)
    return {
        **asdict(case),
        "status": "ok",
        "note": "",
        "time_median": statistics.median(times),
        "time_q25": _quantile(times, 0.25),
        "time_q75": _quantile(times, 0.75),
        "cpu_time_median": statistics.median(cpu_times),
        "repeats": repeats,
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
    "torch._dynamo",  # imported lazily by the first torch.func call: 1 s and tens of MB
    "gradlens",
    "opacus",
    "backpack",
    "benchmarks.preload",
]
"""Modules the forkserver imports once, so that no case pays or measures their import."""


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    from importlib.util import find_spec

    ctx.set_forkserver_preload([m for m in _PRELOAD if find_spec(m) is not None])
    return ctx


def run_isolated(case: Case, protocol: Protocol, timeout_s: float = 600.0) -> dict[str, object]:
    """Measure ``case`` in a fresh child process and return its record.

    A child that dies (for example killed for memory) or runs past
    ``timeout_s`` gives a record with ``status="failed"`` and a note.
    """
    # Read by the forkserver's preload, which must not touch CUDA before forking.
    os.environ["GRADLENS_BENCH_DEVICE"] = protocol.device
    ctx = _context()
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
