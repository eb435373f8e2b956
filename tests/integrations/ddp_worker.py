"""One rank of the data-parallel tests (run by torchrun from test_ddp.py).

Each rank trains the same model on its shard with the gradlens callback of one framework
(``hf`` or ``lightning``) and saves the micro-batches it drew, the records it measured and
its parameters after training.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def hf(out: Path) -> dict[str, Any]:
    from transformers import Trainer

    from gradlens.integrations import TrainerProbe
    from gradlens.integrations.hf import GradlensCallback, ProbedTrainer
    from tests.integrations.replay import data, net, trait
    from tests.integrations.test_ddp import BEFORE, STEPS, N
    from tests.integrations.test_hf import Pairs, Seen, arguments, pair, recording

    model = net()
    probe = TrainerProbe(trait(), before=BEFORE(), output="logits", path=out / "hf.nc")
    seen = Seen(probe)
    args = arguments(out / "trainer", "sgd")
    args.max_steps = STEPS
    trainer = recording(Trainer)(
        model=model, args=args, train_dataset=Pairs(*data(N)), callbacks=[seen]
    )
    GradlensCallback(probe).add_to(trainer)
    trainer.batches = []
    trainer.train()
    refused = ""
    try:  # the per-example pass sees one rank's examples of the all-reduced gradient
        ProbedTrainer(
            model=net(), args=args, train_dataset=Pairs(*data(N)),
            gradlens=GradlensCallback(TrainerProbe(trait(), output="logits")), examples=pair,
        ).train()  # fmt: skip
    except ValueError as err:
        refused = str(err)
    return {
        "refused": refused,
        "rank": trainer.args.process_index,
        "world": trainer.args.world_size,
        "batches": [(b["x"], b["labels"]) for b in trainer.batches],
        "rows": seen.rows,
        "params": dict(model.named_parameters()),
    }


def lightning(out: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from gradlens import Objective
    from gradlens.integrations import TrainerProbe
    from gradlens.integrations.lightning import GradlensCallback
    from tests.integrations.replay import data, trait
    from tests.integrations.test_ddp import BEFORE, STEPS, N
    from tests.integrations.test_lightning import Module, Seen

    module = Module("sgd")
    probe = TrainerProbe(trait(), before=BEFORE(), output="logits", path=out / "lightning.nc")
    seen = Seen(probe)
    trainer = pl.Trainer(
        max_steps=STEPS, accumulate_grad_batches=2, accelerator="cpu", devices=2,
        strategy="ddp", precision="64-true", callbacks=[GradlensCallback(probe), seen],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(*data(N)), batch_size=4, shuffle=False)
    trainer.fit(module, loader)
    refused = ""
    examples = GradlensCallback(
        TrainerProbe(trait(), output="logits"),
        examples=lambda b: Objective(F.cross_entropy, b[0], (b[1],)),
    )
    again = pl.Trainer(
        max_steps=1, accelerator="cpu", devices=2, strategy="ddp", precision="64-true",
        callbacks=[examples], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    try:  # the per-example pass sees one rank's examples of the all-reduced gradient
        again.fit(Module("sgd"), loader)
    except ValueError as err:
        refused = str(err)
    return {
        "refused": refused,
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "batches": module.batches,
        "rows": seen.rows,
        "params": {n.removeprefix("net."): p for n, p in module.named_parameters()},
    }


def main(framework: str, out: Path) -> None:
    warnings.simplefilter("ignore")  # the frameworks' own hints; the test checks the values
    saved = {"hf": hf, "lightning": lightning}[framework](out)
    saved["params"] = {n: p.detach().clone() for n, p in saved["params"].items()}
    torch.save(saved, out / f"{framework}{saved['rank']}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
