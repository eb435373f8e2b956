"""One rank of the data-parallel transformers test (run by torchrun from test_ddp.py).

Each rank trains the same model on its shard with the gradlens callback and saves the
micro-batches it drew, the records it measured and its parameters after training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    from transformers import Trainer

    from gradlens.integrations import TrainerProbe
    from gradlens.integrations.hf import GradlensCallback
    from tests.integrations.replay import data, net, trait
    from tests.integrations.test_ddp import BEFORE, STEPS, N
    from tests.integrations.test_hf import Pairs, Seen, arguments, recording

    model = net()
    probe = TrainerProbe(trait(), before=BEFORE(), output="logits", path=out / "run.nc")
    seen = Seen(probe)
    args = arguments(out / "trainer", "sgd")
    args.max_steps = STEPS
    trainer = recording(Trainer)(
        model=model, args=args, train_dataset=Pairs(*data(N)), callbacks=[seen]
    )
    GradlensCallback(probe).add_to(trainer)
    trainer.batches = []
    trainer.train()
    rank = trainer.args.process_index
    saved = {
        "world": trainer.args.world_size,
        "batches": [(b["x"], b["labels"]) for b in trainer.batches],
        "rows": seen.rows,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    torch.save(saved, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
