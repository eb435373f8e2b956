"""Under the trainers' mixed precision: bf16 autocast works, a GradScaler is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from gradlens import Objective
from gradlens.integrations import TrainerProbe
from tests.integrations.replay import Row, assert_measures, data, net, trait

pytest.importorskip("transformers")  # the dev extra installs both; see pyproject
pl = pytest.importorskip("lightning.pytorch")
from transformers import Trainer, TrainerCallback  # noqa: E402

from gradlens.integrations import hf, lightning  # noqa: E402
from tests.integrations.test_hf import Pairs, arguments, pair  # noqa: E402
from tests.integrations.test_lightning import Module  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning"
    ),
    pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers"),
]


class Snapshot:
    """What the optimizer is handed at each step: the parameters, their .grad, the records."""

    def __init__(self, probe: TrainerProbe, model: torch.nn.Module) -> None:
        self.probe, self.model = probe, model
        self.dtypes: set[torch.dtype] = set()
        self.steps: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self.records: list[Row] = []
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype))

    def before(self) -> None:
        named = dict(self.model.named_parameters())
        self.steps.append(
            ({n: p.detach().clone() for n, p in named.items()},
             {n: p.grad.detach().clone() for n, p in named.items()})
        )  # fmt: skip

    def after(self) -> None:
        assert self.probe.result is not None
        self.records.append(dict(self.probe.result.records))

    def check(self) -> None:
        assert torch.bfloat16 in self.dtypes, "the training forward did not run under autocast"
        assert len(self.steps) == len(self.records) == 2
        for (params, grad), records in zip(self.steps, self.records, strict=True):
            assert_measures(records, self.model, params, grad)


def test_hf_bf16_autocast_measures_the_gradient_the_optimizer_gets(tmp_path: Path) -> None:
    model = net(torch.float32)
    probe = TrainerProbe(trait(torch.float32), output="logits")
    snap = Snapshot(probe, model)

    class Hook(TrainerCallback):
        def on_pre_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            snap.before()

        def on_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            snap.after()

    args = arguments(tmp_path, "sgd", bf16=True)
    args.max_steps = 2
    trainer = Trainer(
        model=model, args=args, train_dataset=Pairs(*data(dtype=torch.float32)), callbacks=[Hook()]
    )
    hf.GradlensCallback(probe).add_to(trainer)
    trainer.train()
    snap.check()


def test_hf_fp16_and_per_example_bf16_are_refused(tmp_path: Path) -> None:
    dataset = Pairs(*data(dtype=torch.float32))
    probe = TrainerProbe(trait(torch.float32), output="logits")
    trainer = Trainer(
        model=net(torch.float32), args=arguments(tmp_path, "sgd"), train_dataset=dataset
    )
    trainer.args.fp16 = True  # TrainingArguments on a CPU-only machine: set after the accelerator
    hf.GradlensCallback(probe).add_to(trainer)
    with pytest.raises(ValueError, match=r"fp16=True.*GradScaler.*bf16=True"):
        trainer.train()
    trainer = hf.ProbedTrainer(
        model=net(torch.float32), args=arguments(tmp_path, "sgd", bf16=True),
        train_dataset=dataset, gradlens=hf.GradlensCallback(probe), examples=pair,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"per-example pass of ProbedTrainer.*float32 or float64"):
        trainer.train()


def fit(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Any:
    x, y = data(dtype=torch.float32)
    module = Module("sgd").float()
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return module


def test_lightning_bf16_mixed_measures_the_gradient_the_optimizer_gets(tmp_path: Path) -> None:
    probe = TrainerProbe(trait(torch.float32), output="logits")

    class Hook(pl.Callback):
        def setup(self, trainer: Any, module: Any, stage: str) -> None:
            self.snap = Snapshot(probe, module)

        def on_before_optimizer_step(self, *args: Any) -> None:
            self.snap.before()

        def on_train_batch_end(self, *args: Any) -> None:
            self.snap.after()

    hook = Hook()
    fit(tmp_path, [lightning.GradlensCallback(probe), hook], precision="bf16-mixed")
    hook.snap.check()


def test_lightning_grad_scaler_and_per_example_bf16_are_refused(tmp_path: Path) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    probe = TrainerProbe(trait(torch.float32), output="logits")
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"GradScaler.*bf16-mixed"):
        fit(tmp_path, [lightning.GradlensCallback(probe)], plugins=[scaled])
    examples = lightning.GradlensCallback(
        probe, examples=lambda b: Objective(F.cross_entropy, b[0], (b[1],))
    )
    with pytest.raises(ValueError, match=r"per-example pass.*'32-true' or '64-true'"):
        fit(tmp_path, [examples], precision="bf16-mixed")
