"""Check every method against the per-example autograd loop before timing it.

The loop (d) is the ground truth: one ``autograd.grad`` per example. It is
itself checked against ``per_example_grads`` (b). A method whose output does
not agree is not timed: a wrong fast method is worthless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.cases import METHODS, Method, Options, Output, missing_requirement
from benchmarks.models import Workload
from gradlens.errors import UnsupportedModelError

__all__ = ["TOLERANCE", "Agreement", "verify_methods"]

TOLERANCE = 1e-4
"""Largest accepted ``max|out - truth| / max|truth|`` per tensor (float32)."""


@dataclass(frozen=True)
class Agreement:
    """Outcome of checking one method on one model.

    ``status`` is ``"ok"``, ``"mismatch"`` (ran, wrong values), ``"unsupported"``
    (the library refused the model), ``"missing"`` (optional dependency not
    installed) or ``"error"`` (anything else); only ``"ok"`` methods are timed.
    """

    method: str
    status: str
    error: float
    note: str = ""


def _relative_error(out: Tensor, truth: Tensor) -> float:
    if out.shape != truth.shape:
        return float("inf")
    scale = truth.abs().max().clamp_min(torch.finfo(truth.dtype).tiny)
    return float((out - truth).abs().max() / scale)


def _worst(outs: dict[str, Tensor] | None, truths: dict[str, Tensor]) -> float:
    if outs is None or set(outs) != set(truths):
        return float("inf")
    return max(_relative_error(outs[n].detach(), truths[n]) for n in truths)


def _error_against(method: Method, out: Output, truth: dict[str, Tensor], w: Workload) -> float:
    if method.kind == "mean":
        return _worst(out.mean, {n: g.mean(0) for n, g in truth.items()})
    if method.kind == "grads":
        return _worst(out.grads, truth)
    flat = {n: g.flatten(start_dim=1) for n, g in truth.items()}
    dots = {n: f @ w.reference[n].flatten() for n, f in flat.items()}
    sq_norms = {n: f.pow(2).sum(dim=1) for n, f in flat.items()}
    return max(_worst(out.dots, dots), _worst(out.sq_norms, sq_norms))


def _check(method: Method, w: Workload, options: Options, truth: dict[str, Tensor]) -> Agreement:
    if method.kind == "floor":
        return Agreement(method.name, "ok", float("nan"), "")
    missing = missing_requirement(method)
    if missing is not None:
        return Agreement(method.name, "missing", float("nan"), missing)
    try:
        with method.prepare(w, options) as run:
            out = run()
    except (UnsupportedModelError, NotImplementedError) as err:
        return Agreement(method.name, "unsupported", float("nan"), _first_line(err))
    except Exception as err:  # a library failing on a model is a result, not a crash
        return Agreement(method.name, "error", float("nan"), _first_line(err))
    error = _error_against(method, out, truth, w)
    status = "ok" if error <= TOLERANCE else "mismatch"
    note = "" if status == "ok" else f"max relative error {error:.2e} > {TOLERANCE:.0e}"
    return Agreement(method.name, status, error, note)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def verify_methods(w: Workload, names: list[str], options: Options) -> dict[str, Agreement]:
    """Run every named method once on ``w`` and compare it with the autograd loop.

    The loop itself is compared with ``per_example_grads`` (b).

    Args:
        w: A small workload (a few examples).
        names: Method names from :data:`benchmarks.cases.METHODS`.
        options: Method options.

    Returns:
        Method name -> :class:`Agreement`.
    """
    with METHODS["loop"].prepare(w, options) as run:
        truth = run().grads
    assert truth is not None
    truth = {n: g.detach() for n, g in truth.items()}
    results = {}
    for name in names:
        if name == "loop":
            with METHODS["pe_grads"].prepare(w, options) as run:
                check = run().grads
            error = _worst(truth, check or {})
            ok = error <= TOLERANCE
            note = "" if ok else f"loop and per_example_grads differ by {error:.2e}"
            results[name] = Agreement(name, "ok" if ok else "mismatch", error, note)
        else:
            results[name] = _check(METHODS[name], w, options, truth)
    return results
