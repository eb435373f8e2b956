"""The agreement check that runs before any timing: a wrong fast method is worthless.

Probe methods are compared with a per-example autograd loop (one
``autograd.grad`` per example), which is itself compared with
``per_example_grads``. Step methods must apply the same update, from the same
state, as a step computed by plain autograd (with the training gradient
projected off the trait gradient for ``remove_aligned``). Only methods whose
check passes are timed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from gradlens import per_example_grads
from gradlens.errors import UnsupportedModelError
from gradlens_bench.contract import Check, Method
from gradlens_bench.models import ProbeWorkload, Workload, forward
from gradlens_bench.step import StepWorkload, reference_update

__all__ = ["TOLERANCE", "Agreement", "against_loop", "loop_grads", "same_update", "verify"]

TOLERANCE = 1e-4
"""Largest accepted relative error per tensor (float32)."""


def _relative_error(out: Tensor, truth: Tensor) -> float:
    if out.shape != truth.shape:
        return float("inf")
    scale = truth.abs().max().clamp_min(torch.finfo(truth.dtype).tiny)
    return float((out.detach() - truth).abs().max() / scale)


def _worst(outs: dict[str, Tensor] | None, truths: dict[str, Tensor]) -> float:
    if outs is None or set(outs) != set(truths):
        return float("inf")
    return max(_relative_error(outs[n], truths[n]) for n in truths)


def loop_grads(w: ProbeWorkload) -> dict[str, Tensor]:
    """Per-example gradients, shape ``(example, *param)``, from one backward per example."""
    named = [(n, p) for n, p in w.model.named_parameters() if p.requires_grad]
    grads = {n: p.new_empty((len(w.inputs), *p.shape)) for n, p in named}
    for i, (x, y) in enumerate(zip(w.inputs, w.targets, strict=True)):
        found = torch.autograd.grad(w.loss_fn(forward(w, x[None]), y[None]), [p for _, p in named])
        for g, one in zip(grads.values(), found, strict=True):
            g[i] = one
    return grads


def against_loop(kind: Literal["mean", "grads", "dots", "loop"]) -> Check:
    """A check of a probe method's ``kind`` of output against :func:`loop_grads`.

    ``"loop"`` checks the loop itself against ``per_example_grads``.
    """

    def check(method: Method, workload: Workload) -> float:
        w = cast(ProbeWorkload, workload)
        truth = {n: g.detach() for n, g in loop_grads(w).items()}
        if kind == "loop":
            found = per_example_grads(w.model, w.loss_fn, w.inputs, w.targets, output=w.output)
            return _worst(found, truth)
        with method.prepare(w) as run:
            out = run()
        if kind == "mean":
            return _worst(out.mean, {n: g.mean(0) for n, g in truth.items()})
        if kind == "grads":
            return _worst(out.grads, truth)
        flat = {n: g.flatten(start_dim=1) for n, g in truth.items()}
        dots = {n: f @ w.reference[n].flatten() for n, f in flat.items()}
        sq_norms = {n: f.square().sum(dim=1) for n, f in flat.items()}
        return max(_worst(out.dots, dots), _worst(out.sq_norms, sq_norms))

    return check


def same_update(project: bool = False) -> Check:
    """A check that a step method applies :func:`gradlens_bench.step.reference_update`.

    The error is ``|delta - reference| / |reference|`` (Euclidean norms) for the
    worst parameter tensor, both steps taken from copies of the same state.
    With ``project`` the update is ``g - c g_t`` and the denominator is the
    size of its two operands, ``|update without projection| + |projection
    term|``: where the projection term outweighs a tensor's own gradient (a
    ResNet's BatchNorm weight), float32 rounding of the global ``c`` is
    relative to that term, not to the small remainder.
    """

    def check(method: Method, workload: Workload) -> float:
        w = copy.deepcopy(cast(StepWorkload, workload))
        truth = reference_update(w, project)
        plain = reference_update(w, False) if project else truth
        scale = {n: plain[n].norm() + (plain[n] - truth[n]).norm() for n in truth}
        before = {n: p.detach().clone() for n, p in w.student.named_parameters()}
        with method.prepare(w) as run:
            run()
        worst = 0.0
        for n, p in w.student.named_parameters():
            diff = (p.detach() - before[n] - truth[n]).norm()
            worst = max(worst, float(diff / scale[n].clamp_min(1e-30)))
        return worst

    return check


@dataclass(frozen=True)
class Agreement:
    """Outcome of checking one method on one model.

    ``status`` is ``"ok"``, ``"mismatch"`` (ran, wrong values), ``"unsupported"``
    (the library refused the model), ``"missing"`` (optional dependency not
    installed) or ``"error"`` (anything else); only ``"ok"`` methods are timed.
    """

    status: str
    error: float = float("nan")
    note: str = ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def verify(method: Method, w: Workload) -> Agreement:
    """Check ``method`` on ``w`` (a few examples); a failing library is a result, not a crash."""
    if method.check is None:
        return Agreement("ok", note="")
    missing = method.missing()
    if missing is not None:
        return Agreement("missing", note=missing)
    try:
        error = method.check(method, w)
    except (UnsupportedModelError, NotImplementedError) as err:
        return Agreement("unsupported", note=_first_line(err))
    except Exception as err:
        return Agreement("error", note=_first_line(err))
    if error <= TOLERANCE:
        return Agreement("ok", error)
    return Agreement("mismatch", error, f"max relative error {error:.2e} > {TOLERANCE:.0e}")
