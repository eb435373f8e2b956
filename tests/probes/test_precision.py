"""Reduced precision: float32 dots and norms on every path, and the noise-floor warning.

Under ``torch.autocast(bfloat16)`` and on a bfloat16 model, the vmap and ghost
paths return float32 values that agree with each other and with the float64
autograd loop within :data:`BF16_TOL` of the largest value: bfloat16 keeps 8
bits of mantissa (eps = 2**-8 = 3.9e-3), and a forward and backward through a
few layers rounds several times, so 5% (13 eps) bounds these small models.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import Objective, per_example_dots, probe_batch, probed_step
from gradlens.errors import PrecisionWarning
from gradlens.probes import mean_grad
from gradlens.probes.precision import NOISE_FLOOR
from tests.models import loop_grads, loss_fn, make_case
from tests.probes.test_ghost import reference_for
from tests.zoo import make_forms

BF16_TOL = 0.05
"""Largest accepted ``|bf16 - float64| / max|float64|`` of per-example dots and norms."""

KINDS = ("mlp", "cnn", "tokens", "norms")
NOISE = Path(__file__).parents[2] / "docs" / "results" / "precision_floor" / "noise.json"


def make(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    if kind == "norms":
        return make_forms(kind, batch=6)
    return make_case(kind, batch=6)


def exact(model: nn.Module, x: Tensor, y: Tensor, ref: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed per-example dots and squared norms, ``(example,)`` each, from the float64 loop."""
    grads = loop_grads(model, x, y)
    dots = sum(g.flatten(1) @ ref[n].reshape(-1) for n, g in grads.items())
    sq = sum(g.flatten(1).square().sum(1) for g in grads.values())
    return dots, sq  # type: ignore[return-value]


def close(found: dict[str, Tensor], want: Tensor) -> None:
    assert all(v.dtype == torch.float32 for v in found.values()), {v.dtype for v in found.values()}
    total = sum(found.values()).double()  # type: ignore[union-attr]
    scale = float(want.abs().max())
    assert float((total - want).abs().max()) <= BF16_TOL * scale


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["vmap", "auto"])
# torch's own, once per process: nn.RMSNorm under autocast gets a bfloat16 input, float32 weight
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")
def test_under_bf16_autocast_dots_are_float32_and_near_the_float64_loop(
    kind: str, method: str
) -> None:
    model, x, y = make(kind)
    ref = reference_for(model)
    want_dots, want_sq = exact(model, x, y, ref)
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe = probe_batch(model, loss_fn, x.float(), y, reference=ref, method=method)
    close(probe.dots, want_dots)
    close(probe.sq_norms, want_sq)
    assert all(g.dtype == torch.float32 for g in probe.grad.values())


@pytest.mark.parametrize("kind", KINDS)
def test_on_a_bf16_model_vmap_and_ghost_agree_and_are_float32(kind: str) -> None:
    model, x, y = make(kind)
    ref = reference_for(model)
    want_dots, want_sq = exact(model, x, y, ref)
    model.to(torch.bfloat16)
    low = x.to(torch.bfloat16)
    found = {m: per_example_dots(model, loss_fn, low, y, reference=ref, method=m)
             for m in ("vmap", "auto")}  # fmt: skip
    for dots, sq in found.values():
        close(dots, want_dots)
        close(sq, want_sq)
    probe = probe_batch(model, loss_fn, low, y, reference=ref)
    assert all(g.dtype == torch.bfloat16 for g in probe.grad.values())  # steps in its own dtype


def test_float64_stays_float64() -> None:
    model, x, y = make("mlp")
    dots, sq = per_example_dots(model, loss_fn, x, y, reference=reference_for(model))
    assert {v.dtype for v in (*dots.values(), *sq.values())} == {torch.float64}


def test_the_noise_floor_is_the_committed_measurement() -> None:
    found = json.loads(NOISE.read_text())["abs_error"]
    settings = {
        torch.bfloat16: ("autocast_bf16", "weights_bf16"),
        torch.float16: ("autocast_fp16",),
    }
    for dtype, names in settings.items():
        p95 = max(found[s]["batch"]["p95"] for s in names)
        assert p95 <= NOISE_FLOOR[dtype] <= 1.05 * p95, (dtype, p95)


def orthogonal_reference(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """A reference orthogonal (in float64) to the batch gradient: its true cosine is 0."""
    g = mean_grad(model, loss_fn, x, y)
    r = reference_for(model)
    coef = sum(float((g[n] * r[n]).sum()) for n in g) / sum(
        float(v.square().sum()) for v in g.values()
    )
    return {n: r[n] - coef * g[n] for n in g}


def bf16_case() -> tuple[nn.Module, Tensor, Tensor, dict[str, Tensor]]:
    model, x, y = make("mlp")
    perp = orthogonal_reference(model, x, y)
    return model, x, y, perp


def test_an_alignment_within_the_bf16_noise_floor_warns_once_and_can_be_silenced() -> None:
    model, x, y, perp = bf16_case()
    model.to(torch.bfloat16)
    low = x.to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            probe_batch(model, loss_fn, low, y, reference=perp)
    found = [w for w in seen if issubclass(w.category, PrecisionWarning)]
    assert len(found) == 1, [str(w.message) for w in seen]
    assert "noise floor" in str(found[0].message) and "bfloat16" in str(found[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=PrecisionWarning)
        probe_batch(model, loss_fn, low, y, reference=perp)


def test_no_warning_in_float32_or_for_an_alignment_above_the_floor() -> None:
    model, x, y, perp = bf16_case()
    model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any PrecisionWarning fails
        probe_batch(model, loss_fn, x.float(), y, reference=perp)  # float32: no floor
        g = mean_grad(model, loss_fn, x.float(), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe_batch(model, loss_fn, x.float(), y, reference=g)  # cos ~ 1


def test_autocast_warns_for_an_orthogonal_reference() -> None:
    model, x, y, perp = bf16_case()
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(PrecisionWarning):
        probe_batch(model, loss_fn, x.float(), y, reference=perp)


def test_probed_step_in_bf16_runs_the_check_and_records_float32_cosines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(NOISE_FLOOR, torch.bfloat16, 1.0)  # every |cos| < 1 is "within" it
    model, x, y = make("mlp")
    model.to(torch.bfloat16)
    low = x.to(torch.bfloat16)
    with pytest.warns(PrecisionWarning):
        out = probed_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            Objective(F.cross_entropy, low, (y,)),
            Objective(F.cross_entropy, low.flip(0), (y.flip(0),)),
        )
    for name in ("cosine", "layer_cosine", "example_cosine_mean", "update_cosine"):
        assert out.records[name].dtype == torch.float32, name  # summed in float32
    assert out.example_cosine.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # stepped in its dtype
