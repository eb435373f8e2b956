"""What every integration is checked against: probed_step on the same batches, in float64."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import Tensor, nn

from gradlens import Objective, StepResult, open_run, probed_step
from gradlens.training import TransformLayout, step_values, transform_layout
from gradlens.transforms import GradientTransform, named_chain, remove_aligned

Batch = tuple[Tensor, Tensor]
Row = dict[str, Tensor]


class Net(nn.Module):
    """A small classifier that returns a dict, as a Hugging Face model does (loss with labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.body(x)
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def net(dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def data(n: int = 24, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def trait(dtype: torch.dtype = torch.float64) -> Objective:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 5, generator=gen, dtype=dtype)
    return Objective(F.cross_entropy, x, (torch.randint(0, 3, (10,), generator=gen),))


def heldout(dtype: torch.dtype = torch.float64) -> Objective:
    """Other labelled trait examples: the held-out trait batch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 5, generator=gen, dtype=dtype)
    return Objective(F.cross_entropy, x, (torch.randint(0, 3, (10,), generator=gen),))


def row(result: StepResult, layout: TransformLayout | None) -> Row:
    """A step's records as a run file holds them, in the records' own dtype."""
    return {**step_values(result, layout), "example_cosine": result.example_cosine}


def classify(batch: Batch) -> Objective:
    x, y = batch
    return Objective(F.cross_entropy, x, (y,))


def replay(
    model: nn.Module,
    steps: Sequence[Sequence[Any]],
    optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    before: GradientTransform | None = None,
    *,
    objective: Callable[[Any], Objective] = classify,
    trait_objective: Objective | None = None,
    after: GradientTransform | None = None,
    **options: Any,
) -> list[Row]:
    """probed_step on each step's micro-batches (gradient accumulation): each step's row.

    ``options`` go to probed_step (``heldout=``, ``momentum=``).
    """
    opt = optimizer(model)
    params = dict(model.named_parameters())
    detached = {n: p.detach() for n, p in params.items()}
    state = None if before is None else before.init(detached)
    after_state = None if after is None else after.init(detached)
    layout = transform_layout(params, before=before, after=after)
    rows = []
    for batches in steps:
        train = [objective(b) for b in batches]
        t = trait() if trait_objective is None else trait_objective
        result = probed_step(
            model, opt, train, t, before=before, before_state=state, output="logits",
            after=after, after_state=after_state, **options,
        )  # fmt: skip
        state, after_state = result.before_state, result.after_state
        rows.append(row(result, layout))
    return rows


EXAMPLE_RECORDS = (
    "train_loss",
    "example_cosine",
    "example_cosine_mean",
    "example_cosine_quantile",
    "example_cosine_frac_positive",
)


def _values(rows: Sequence[Row], name: str) -> np.ndarray:
    return np.stack([r[name].detach().double().numpy() for r in rows])


def assert_rows_match(
    got: Sequence[Row],
    want: Sequence[Row],
    *,
    examples: bool,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> list[str]:
    """Every record equals the replay's; without the per-example pass those are absent.

    float64 records: rtol 1e-10 (the same sums in another order), atol 1e-12 for dots that
    cancel; the transform fields are float32 on both sides (step_values): rtol 1e-6.
    """
    assert len(got) == len(want) > 0
    checked = []
    for name in want[0]:
        if name in EXAMPLE_RECORDS and not examples:
            absent = name not in got[0] or all(r[name].numel() == 0 for r in got)
            assert absent, f"{name} without the per-example pass"
            continue
        a, b = _values(got, name), _values(want, name)
        tol = (1e-6, 1e-7) if name.startswith("transform_") else (rtol, atol)
        np.testing.assert_allclose(a, b, rtol=tol[0], atol=tol[1], err_msg=name)
        checked.append(name)
    return checked


def assert_file_matches(run: xr.Dataset, want: Sequence[Row], *, examples: bool) -> None:
    """The run file holds the replay's records (stored as float32: rtol 1e-6)."""
    assert run.sizes["step"] == len(want)
    for name in want[0]:
        if name == "example_cosine" and not examples:
            assert "example_step" not in run.sizes or run.sizes["example_step"] == 0
            continue
        values = run[name].values
        if name in EXAMPLE_RECORDS and not examples:
            assert np.isnan(values).all(), name
            continue
        np.testing.assert_allclose(values, _values(want, name), rtol=1e-6, atol=1e-7, err_msg=name)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14, msg=name)


def assert_measures(
    records: Row, model: nn.Module, params: dict[str, Tensor], grad: dict[str, Tensor]
) -> None:
    """``cosine`` and ``layer_cosine`` are those of ``grad`` with ``g_t`` at ``params``.

    The oracle: one ``torch.autograd.grad`` of the trait loss on a copy of ``model`` holding
    ``params``, in their dtype (float32: rtol 1e-5 for sums of a hundred terms), and numpy
    dots over the flattened parameters, the layers written out from the names.
    """
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(params, strict=False)
    live = dict(copy_.named_parameters())
    t = trait(next(iter(params.values())).dtype)
    loss = F.cross_entropy(copy_(t.inputs)["logits"], *t.targets)
    g_t = dict(zip(live, torch.autograd.grad(loss, list(live.values())), strict=True))

    def cos(names: list[str]) -> float:
        a = np.concatenate([grad[n].double().numpy().ravel() for n in names])
        b = np.concatenate([g_t[n].double().numpy().ravel() for n in names])
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    layers: dict[str, list[str]] = {}
    for name in live:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    np.testing.assert_allclose(float(records["cosine"]), cos(list(live)), rtol=1e-5)
    want = [cos(names) for names in layers.values()]
    np.testing.assert_allclose(records["layer_cosine"].double().numpy(), want, rtol=1e-5)


def options() -> dict[str, Any]:
    """The step's options beyond ``before=``, for the trainer's probe and the replay alike."""
    return {
        "after": named_chain(("remove", remove_aligned())),
        "heldout": heldout(),
        "momentum": True,
    }


def assert_options_match(
    got: Sequence[Row], want: Sequence[Row], trained: nn.Module, start: nn.Module, path: Path
) -> None:
    """With :func:`options` and per-example values: every record equals the replay's, the
    optional ones included, in memory and in the run file at ``path``, and the parameters
    are the replay's (``old + after(update)``)."""
    checked = assert_rows_match(got, want, examples=True)
    optional = {"momentum_cosine", "heldout_trait_loss", "heldout_cosine", "heldout_update_cosine"}
    assert optional | {"transform_coef", "update_cosine"} <= set(checked)
    for r in got:  # the optimizer has a first moment; the update is off g_t (after=remove)
        assert torch.isfinite(r["momentum_cosine"])
        assert abs(float(r["update_cosine"])) < 1e-10
    assert_same_params(trained, start)
    with open_run(path) as run:
        assert_file_matches(run, want, examples=True)
