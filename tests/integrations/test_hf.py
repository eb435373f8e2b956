"""The transformers integration equals probed_step on the same batches, in float64."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from gradlens import Objective, open_run
from gradlens.integrations import TrainerProbe
from gradlens.transforms import named_chain, remove_aligned, scale_aligned_per_example
from tests.integrations.replay import (
    assert_file_matches,
    assert_options_match,
    assert_rows_match,
    assert_same_params,
    data,
    net,
    options,
    replay,
    row,
    trait,
)

transformers = pytest.importorskip("transformers")  # the dev extra installs it; see pyproject
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradlens.integrations.hf import GradlensCallback, ProbedTrainer  # noqa: E402

MICRO, ACCUMULATE, STEPS = 4, 2, 3


def pair(batch: dict[str, Tensor]) -> Objective:
    """The micro-batch as the trainer's loss sees it: cross-entropy of the logits."""
    return Objective(F.cross_entropy, batch["x"], (batch["labels"],))


class Pairs(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Seen(TrainerCallback):
    """After the gradlens callback: each step's row (float64) and each log."""

    def __init__(self, probe: TrainerProbe) -> None:
        self.probe, self.rows, self.logs = probe, [], []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.probe.result is not None
        self.rows.append(row(self.probe.result, self.probe.layout))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append(dict(logs))


def recording(base: type[Trainer]) -> type[Trainer]:
    class Recording(base):  # type: ignore[misc, valid-type]
        """Keeps the micro-batches the trainer draws, in order, for the replay."""

        def training_step(self, model: Any, inputs: Any, *args: Any) -> Tensor:
            self.batches.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, *args)

    return Recording


def arguments(tmp_path: Path, optim: str, **kwargs: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS,
        learning_rate=0.1,
        optim=optim,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "adamw_torch": lambda m: torch.optim.AdamW(
        m.parameters(), lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    ),
}


def train(
    tmp_path: Path, optim: str, *, examples: bool, before: Any = None, **options: Any
) -> dict[str, Any]:
    """Train, and replay on the same batches; ``options`` go to both (after=, heldout=, ...)."""
    model = net()
    start = copy.deepcopy(model)
    probe = TrainerProbe(
        trait(), before=before, output="logits", path=tmp_path / "run.nc", **options
    )
    callback = GradlensCallback(probe)
    seen = Seen(probe)
    args = arguments(tmp_path, optim)
    dataset = Pairs(*data())
    if examples:
        trainer = recording(ProbedTrainer)(
            model=model, args=args, train_dataset=dataset, callbacks=[seen],
            gradlens=callback, examples=pair,
        )  # fmt: skip
    else:
        trainer = recording(Trainer)(
            model=model, args=args, train_dataset=dataset, callbacks=[seen]
        )
        callback.add_to(trainer)
    trainer.batches = []
    trainer.train()
    b = [(d["x"], d["labels"]) for d in trainer.batches]
    steps = [b[i : i + ACCUMULATE] for i in range(0, len(b), ACCUMULATE)]
    assert len(steps) == STEPS and all(len(s) == ACCUMULATE for s in steps)
    want = replay(start, steps, OPTIMIZERS[optim], before=before, **options)
    return {"seen": seen, "want": want, "model": model, "start": start, "path": tmp_path / "run.nc"}


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_the_callback_equals_probed_step_with_accumulation(tmp_path: Path, optim: str) -> None:
    before = named_chain(("remove", remove_aligned()))
    out = train(tmp_path, optim, examples=False, before=before)
    checked = assert_rows_match(out["seen"].rows, out["want"], examples=False)
    assert {"cosine", "layer_cosine", "applied_cosine", "update_cosine", "transform_coef"} <= set(
        checked
    )
    assert_same_params(out["model"], out["start"])
    with open_run(out["path"]) as run:
        assert_file_matches(run, out["want"], examples=False)
    # the trainer's own logs carry the step's scalars (logging_steps=1: the mean of one step)
    logs = [log for log in out["seen"].logs if "loss" in log]
    assert len(logs) == STEPS
    for log, want in zip(logs, out["want"], strict=True):
        assert log["gradlens/cosine"] == pytest.approx(float(want["cosine"]), rel=1e-10)
        assert log["gradlens/update_cosine"] == pytest.approx(
            float(want["update_cosine"]), rel=1e-10
        )


def test_the_probed_trainer_adds_per_example_values(tmp_path: Path) -> None:
    before = named_chain(("scale", scale_aligned_per_example(0.5)))
    out = train(tmp_path, "sgd", examples=True, before=before)
    checked = assert_rows_match(out["seen"].rows, out["want"], examples=True)
    assert {"train_loss", "example_cosine", "example_cosine_quantile"} <= set(checked)
    assert_same_params(out["model"], out["start"])
    with open_run(out["path"]) as run:
        assert_file_matches(run, out["want"], examples=True)


def test_the_after_transform_heldout_and_momentum_equal_probed_steps(tmp_path: Path) -> None:
    out = train(tmp_path, "adamw_torch", examples=True, **options())
    rows, want = out["seen"].rows, out["want"]
    assert_options_match(rows, want, out["model"], out["start"], out["path"])


def test_the_per_example_check_holds_under_the_trainers_clipping(tmp_path: Path) -> None:
    probe = TrainerProbe(trait(), output="logits")
    args = arguments(tmp_path, "sgd")
    args.max_grad_norm = 0.01
    trainer = ProbedTrainer(
        model=net(), args=args, train_dataset=Pairs(*data()),
        gradlens=GradlensCallback(probe), examples=pair,
    )  # fmt: skip
    trainer.train()
    run = probe.recorder.dataset()
    # every step clipped (its norm is about 1 before): the norm clip_grad_norm_ leaves (eps 1e-6)
    np.testing.assert_allclose(run["train_norm"].values, 0.01, rtol=1e-4)
    assert np.isfinite(run["example_cosine_mean"].values).all()


def test_add_to_puts_the_callback_ahead_of_the_reporters(tmp_path: Path) -> None:
    """report_to's callbacks come right after the trainer's defaults, ahead of callbacks=[...];
    a stand-in reporter there (tensorboard and wandb are not installed here) sees the values."""
    probe = TrainerProbe(trait(), output="logits")
    seen = Seen(probe)
    trainer = Trainer(model=net(), args=arguments(tmp_path, "sgd"), train_dataset=Pairs(*data()))
    defaults = len(trainer.callback_handler.callbacks)
    trainer.callback_handler.callbacks.insert(defaults, seen)  # where report_to's would be
    GradlensCallback(probe).add_to(trainer)
    trainer.train()
    logs = [log for log in seen.logs if "loss" in log]
    assert len(logs) == STEPS
    for log, records in zip(logs, seen.rows, strict=True):
        assert log["gradlens/cosine"] == pytest.approx(float(records["cosine"]), rel=1e-12)
