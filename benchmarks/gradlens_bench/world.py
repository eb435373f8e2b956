"""Time of the DDP methods on one model: one process per rank, blocks of steps interleaved.

Every rank is a fresh process forked from the benchmark's forkserver
(:func:`gradlens_bench.measure.forkserver`) that joins a gloo group of
``world_size`` processes and builds the model's DDP workload once per method
(:func:`gradlens_bench.models.make_workload`: the same model, teacher and
trait batch on every rank, the rank's own training batch). After two warm-up
steps of each method it takes, in turn, blocks of ``protocol.steps`` steps of
each method, the blocks interleaved (plain, probed, lean, remove, plain, ...)
so that a change in the machine's load hits every method alike;
``protocol.blocks`` blocks of each. A barrier precedes each block's first
clock read and follows its last step, so a block's time is that of the whole
group. Each rank runs ``protocol.threads`` intra-op threads, one if unset.

A method's record gives the median and quartiles over its blocks of the
wall-clock seconds per step and the median of rank 0's process CPU seconds
per step. Peak memory is not measured: the methods share the processes.
"""

from __future__ import annotations

import socket
import statistics
import time
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import numpy as np
import torch
import torch.distributed as dist

from gradlens_bench.measure import Protocol, configure, forkserver
from gradlens_bench.methods import METHODS
from gradlens_bench.models import make_workload

__all__ = ["WARMUP", "measure_world"]

WARMUP = 2
"""Untimed steps of each method before the first block."""

Times = dict[str, dict[str, list[float]]]
"""``{"wall" | "cpu": {method: seconds per step of each block}}``."""


def _interleaved(model: str, batch: int, methods: Sequence[str], protocol: Protocol) -> Times:
    """This rank's seconds per step of every block of every method."""
    cpu = torch.device("cpu")
    found: Times = {"wall": {m: [] for m in methods}, "cpu": {m: [] for m in methods}}
    with ExitStack() as stack:
        runs = {
            m: stack.enter_context(
                METHODS[m].prepare(
                    make_workload(model, batch, cpu, family="ddp", rank=dist.get_rank())
                )
            )
            for m in methods
        }
        for run in runs.values():
            for _ in range(WARMUP):
                run()
        for _ in range(protocol.blocks):
            for method, run in runs.items():
                dist.barrier()
                wall, process = time.perf_counter(), time.process_time()
                for _ in range(protocol.steps):
                    run()
                dist.barrier()
                found["wall"][method].append((time.perf_counter() - wall) / protocol.steps)
                found["cpu"][method].append((time.process_time() - process) / protocol.steps)
    return found


def _rank(
    conn: Connection,
    rank: int,
    world_size: int,
    port: int,
    case: tuple[str, int, tuple[str, ...]],
    protocol: Protocol,
    timeout_s: float,
) -> None:
    """One rank: join the group, time the methods, send ``("ok", times)`` or an error."""
    try:
        configure(torch.device("cpu"), protocol.threads or 1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        conn.send(("ok", _interleaved(*case, protocol)))
    except BaseException as err:  # report every failure back instead of dying silently
        conn.send(("error", traceback.format_exception_only(type(err), err)[-1].strip()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _collect(receivers: list[Connection], timeout_s: float) -> tuple[str, Times | str]:
    """Rank 0's times, or the first failure: ``("ok", times)`` or ``(status, note)``."""
    deadline = time.monotonic() + timeout_s
    pending = dict(enumerate(receivers))
    answers: dict[int, Times] = {}
    while pending:
        ready = wait(list(pending.values()), timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            return "failed", f"timed out after {timeout_s:.0f} s"
        for rank, conn in [(r, c) for r, c in pending.items() if c in ready]:
            del pending[rank]
            try:
                status, payload = conn.recv()
            except EOFError:
                return "failed", f"rank {rank} exited without a result (out of memory?)"
            if status != "ok":
                return status, f"rank {rank}: {payload}"
            answers[rank] = payload
    return "ok", answers[0]


def _record(model: str, batch: int, method: str, times: Times, p: Protocol) -> dict[str, object]:
    wall = times["wall"][method]
    return {
        "model": model,
        "batch": batch,
        "method": method,
        "status": "ok",
        "note": "",
        "time_median": statistics.median(wall),
        "time_q25": float(np.quantile(wall, 0.25)),
        "time_q75": float(np.quantile(wall, 0.75)),
        "cpu_time_median": statistics.median(times["cpu"][method]),
        "repeats": p.steps * p.blocks,
    }


def measure_world(
    model: str,
    batch: int,
    methods: Sequence[str],
    protocol: Protocol,
    world_size: int = 2,
    timeout_s: float = 600.0,
) -> list[dict[str, object]]:
    """Time ``methods`` on the DDP ``model`` with ``batch`` examples per rank, ``world_size`` ranks.

    Returns:
        One record per method, in the order given: the case, ``status`` and
        ``note``, and when measured ``time_median``, ``time_q25``,
        ``time_q75``, ``cpu_time_median`` (seconds per step) and ``repeats``.
        A rank that fails or a group that runs past ``timeout_s`` gives every
        method ``status`` ``"error"`` or ``"failed"`` with a note.
    """
    ctx = forkserver(protocol.device)
    port = _free_port()
    receivers, processes = [], []
    for rank in range(world_size):
        receive, send = ctx.Pipe(duplex=False)
        args = (send, rank, world_size, port, (model, batch, tuple(methods)), protocol, timeout_s)
        processes.append(ctx.Process(target=_rank, args=args, daemon=True))
        processes[-1].start()
        send.close()
        receivers.append(receive)
    status: str = "failed"
    try:
        status, found = _collect(receivers, timeout_s)
    finally:
        for process in processes:
            process.join(timeout=30 if status == "ok" else 1)
            if process.is_alive():
                process.kill()
                process.join()
        for receive in receivers:
            receive.close()
    if isinstance(found, str):
        return [
            {"model": model, "batch": batch, "method": m, "status": status, "note": str(found)}
            for m in methods
        ]
    return [_record(model, batch, m, found, protocol) for m in methods]
