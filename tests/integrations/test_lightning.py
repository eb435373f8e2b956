"""The Lightning integration equals probed_step on the same batches, in float64."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from gradlens import Objective, open_run
from gradlens.integrations import TrainerProbe
from gradlens.transforms import named_chain, remove_aligned, scale_aligned_per_example
from tests.integrations.replay import (
    Net,
    assert_file_matches,
    assert_options_match,
    assert_rows_match,
    assert_same_params,
    data,
    options,
    replay,
    row,
    trait,
)

pl = pytest.importorskip("lightning.pytorch")  # the dev extra installs it; see pyproject

from gradlens.integrations.lightning import GradlensCallback  # noqa: E402

MICRO, ACCUMULATE, STEPS = 4, 2, 3

# Lightning 2.6 on torch 2.14 (its own code, not ours), and its hint about dataloader workers.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning"
    ),
    pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers"),
]


class Module(pl.LightningModule):
    def __init__(self, optim: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net().double()
        self.optim = optim
        self.batches: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.batches.append((x.clone(), y.clone()))
        return F.cross_entropy(self(x)["logits"], y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optim](self)


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.1),
}


class Seen(pl.Callback):
    """After the gradlens callback: each step's row (float64) and what was logged."""

    def __init__(self, probe: TrainerProbe) -> None:
        self.probe, self.rows, self.logged = probe, [], []

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        if (trainer.global_step) > len(self.rows):
            assert self.probe.result is not None
            self.rows.append(row(self.probe.result, self.probe.layout))
            self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(
    tmp_path: Path,
    optim: str,
    *,
    examples: bool,
    before: Any = None,
    precision: str = "64-true",
    **options: Any,
) -> dict[str, Any]:
    """Fit, and replay on the same batches; ``options`` go to both (after=, heldout=, ...)."""
    module = Module(optim)
    start = copy.deepcopy(module)
    probe = TrainerProbe(
        trait(), before=before, output="logits", path=tmp_path / "run.nc", **options
    )
    seen = Seen(probe)
    objective = (lambda b: Objective(F.cross_entropy, b[0], (b[1],))) if examples else None
    trainer = pl.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        accelerator="cpu",
        devices=1,
        precision=precision,
        callbacks=[GradlensCallback(probe, examples=objective), seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    x, y = data()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=MICRO, shuffle=False))
    b = module.batches
    steps = [b[i : i + ACCUMULATE] for i in range(0, len(b), ACCUMULATE)]
    assert len(steps) == STEPS and all(len(s) == ACCUMULATE for s in steps)
    want = replay(start, steps, lambda m: OPTIMIZERS[optim](m), before=before, **options)
    return {"seen": seen, "want": want, "module": module, "start": start, "path": probe.path}


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_the_callback_equals_probed_step_with_accumulation(tmp_path: Path, optim: str) -> None:
    before = named_chain(("remove", remove_aligned()))
    out = fit(tmp_path, optim, examples=False, before=before)
    checked = assert_rows_match(out["seen"].rows, out["want"], examples=False)
    assert {"cosine", "layer_cosine", "applied_cosine", "update_cosine", "transform_coef"} <= set(
        checked
    )
    assert_same_params(out["module"], out["start"])
    with open_run(out["path"]) as run:
        assert_file_matches(run, out["want"], examples=False)
    for logged, want in zip(out["seen"].logged, out["want"], strict=True):
        assert logged["gradlens/cosine"] == pytest.approx(float(want["cosine"]), rel=1e-10)


def test_examples_add_the_per_example_values(tmp_path: Path) -> None:
    before = named_chain(("scale", scale_aligned_per_example(0.5)))
    out = fit(tmp_path, "sgd", examples=True, before=before)
    checked = assert_rows_match(out["seen"].rows, out["want"], examples=True)
    assert {"train_loss", "example_cosine", "example_cosine_quantile"} <= set(checked)
    assert_same_params(out["module"], out["start"])
    with open_run(out["path"]) as run:
        assert_file_matches(run, out["want"], examples=True)


def test_the_after_transform_heldout_and_momentum_equal_probed_steps(tmp_path: Path) -> None:
    out = fit(tmp_path, "adam", examples=True, **options())
    rows, want = out["seen"].rows, out["want"]
    assert_options_match(rows, want, out["module"], out["start"], out["path"])
