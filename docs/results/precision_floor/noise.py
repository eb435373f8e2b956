"""The noise floor of gradlens's cosines in reduced precision, against float64.

For each zoo model (``tests/models.py``, ``tests/zoo.py``) and seed: a float64
model, a training batch and a trait batch. The trait gradient ``g_t`` and
:func:`gradlens.probe_batch` of the training batch against it are computed in
float64 (the truth) and in each reduced setting, as a user would run them:

- ``autocast_bf16``: float32 weights under ``torch.autocast("cpu", torch.bfloat16)``;
- ``autocast_fp16``: the same with float16;
- ``weights_bf16``: the model and inputs cast to bfloat16.

Recorded per setting: ``|cos - cos_float64|`` of every per-example cosine
``cos(g_i, g_t)`` and of the batch cosine ``cos(g, g_t)``, then their median
and 95th percentile. Writes ``noise.json`` beside this file. One thread, CPU.
Run from the repository root:

    PYTHONPATH=$PWD python docs/results/precision_floor/noise.py
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import example_alignment, probe_batch
from gradlens.probes import mean_grad
from gradlens.probes.precision import batch_cosines
from tests.models import make_case
from tests.zoo import make_forms

SEEDS = range(8)
BATCH = 16
KINDS = ("mlp", "cnn", "tokens", "norms", "convs1d", "encoder_batch_first", "attention")
SETTINGS = ("autocast_bf16", "autocast_fp16", "weights_bf16")
warnings.filterwarnings("ignore")  # the PrecisionWarning this measures the floor of


def make(kind: str, seed: int) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """A float64 model (initialised from ``seed``), a training and a trait batch."""
    if kind in ("mlp", "cnn", "tokens"):
        model, x, _ = make_case(kind, batch=BATCH, seed=seed)
    else:
        model, x, _ = make_forms(kind, batch=BATCH, tokens=6)
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and not isinstance(module, nn.MultiheadAttention):
                reset()
    gen = torch.Generator().manual_seed(1000 + seed)

    def draw() -> Tensor:
        return torch.randn(x.shape, generator=gen, dtype=torch.float64)

    labels = [torch.randint(0, 3, (BATCH,), generator=gen) for _ in range(2)]
    return model.eval(), draw(), labels[0], draw(), labels[1]


def cosines(
    model: nn.Module, batch: tuple[Tensor, Tensor, Tensor, Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-example cosines ``(example,)`` and the batch cosine ``()``, as float64."""
    x, y, xt, yt = batch
    cast = (x.to(dtype), y, xt.to(dtype), yt)
    g_t = mean_grad(model, F.cross_entropy, cast[2], cast[3])
    probe = probe_batch(model, F.cross_entropy, cast[0], cast[1], reference=g_t)
    ref = {
        n: r.float() if r.dtype in (torch.bfloat16, torch.float16) else r for n, r in g_t.items()
    }
    per_example = example_alignment(probe.dots, probe.sq_norms, reference=ref).cosine
    stacked = {n: r.unsqueeze(0) for n, r in ref.items()}
    return per_example.double(), batch_cosines(probe.grad, stacked)[0].double()


def run(setting: str, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """The cosines in one reduced setting."""
    if setting == "weights_bf16":
        low = model.to(torch.bfloat16)
        try:
            return cosines(low, batch, torch.bfloat16)  # type: ignore[arg-type]
        finally:
            model.double()
    dtype = torch.bfloat16 if setting == "autocast_bf16" else torch.float16
    model.float()
    try:
        with torch.autocast("cpu", dtype=dtype):
            return cosines(model, batch, torch.float32)  # type: ignore[arg-type]
    finally:
        model.double()


def quantiles(values: list[float]) -> dict[str, float]:
    """Median, 95th percentile, maximum and count of ``values``."""
    found = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(found, torch.tensor([0.5, 0.95], dtype=torch.float64)).tolist()
    return {"median": q[0], "p95": q[1], "max": float(found.max()), "count": len(values)}


def main() -> None:
    """Measure every setting on every model and seed; write ``noise.json``."""
    torch.set_num_threads(1)
    errors: dict[str, dict[str, list[float]]] = {s: {"example": [], "batch": []} for s in SETTINGS}
    truth_batch: list[float] = []
    for kind in KINDS:
        for seed in SEEDS:
            model, *batch = make(kind, seed)
            exact, exact_batch = cosines(model, tuple(batch), torch.float64)  # type: ignore[arg-type]
            truth_batch.append(float(exact_batch))
            for setting in SETTINGS:
                found, found_batch = run(setting, model, tuple(batch))
                errors[setting]["example"] += (found - exact).abs().tolist()
                errors[setting]["batch"].append(abs(float(found_batch - exact_batch)))
    summary = {s: {level: quantiles(v) for level, v in errors[s].items()} for s in SETTINGS}
    out = {
        "command": "PYTHONPATH=$PWD python docs/results/precision_floor/noise.py",
        "torch": torch.__version__,
        "kinds": list(KINDS),
        "seeds": len(SEEDS),
        "batch": BATCH,
        "abs_cos_float64_batch": quantiles([abs(c) for c in truth_batch]),
        "abs_error": summary,
    }
    path = Path(__file__).with_name("noise.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    for s in SETTINGS:
        for level in ("example", "batch"):
            q = summary[s][level]
            print(f"{s:14s} {level:8s} median {q['median']:.2e}  p95 {q['p95']:.2e}  "
                  f"max {q['max']:.2e}  n={q['count']}")  # fmt: skip


if __name__ == "__main__":
    main()
