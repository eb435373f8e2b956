"""CPU cost of per_example_dots (auto, vmap) against a plain backward, on three zoo models.

One thread, float32, B=256, process CPU time (``time.process_time``: the
machine is shared, so wall time would count other processes), the minimum of
``REPEATS`` runs after one warm-up (the plan is cached by then). Writes
``timing.json`` beside this file. Run from the repository root:

    PYTHONPATH=$PWD python docs/results/ghost_forms/timing.py
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens import ghost_plan, per_example_dots

BATCH = 256
REPEATS = 3
warnings.filterwarnings("ignore")


def cnn() -> tuple[nn.Module, Tensor, Tensor]:
    """Three convolutions (one grouped, two strided) and a linear head on 28x28 images."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )
    return model, torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))


class Encoder(nn.Module):
    """A linear embedding, one batch-first ``TransformerEncoderLayer``, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        """``(example, token, 8)`` -> ``(example, 10)``."""
        return self.head(self.layer(self.embed(x)).mean(dim=1))


def encoder() -> tuple[nn.Module, Tensor, Tensor]:
    """The encoder on 16 tokens."""
    return Encoder(), torch.randn(BATCH, 16, 8), torch.randint(0, 10, (BATCH,))


class Gpt2(nn.Module):
    """GPT-2 tiny (random init), the last token's first 10 logits."""

    def __init__(self, positions: bool) -> None:
        super().__init__()
        import transformers

        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        self.gpt = transformers.GPT2LMHeadModel(cfg).eval()
        self.positions = positions

    def forward(self, ids: Tensor) -> Tensor:
        """``(example, token)`` ids -> ``(example, 10)``."""
        kwargs = {}
        if self.positions:  # position ids per example: the position table can go ghost
            kwargs["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids)
        return self.gpt(input_ids=ids, use_cache=False, **kwargs).logits[:, -1, :10]


def gpt2() -> tuple[nn.Module, Tensor, Tensor]:
    """GPT-2 tiny with its default position ids ``(1, token)``."""
    return Gpt2(False), torch.randint(0, 50, (BATCH, 16)), torch.randint(0, 10, (BATCH,))


def gpt2_positions() -> tuple[nn.Module, Tensor, Tensor]:
    """GPT-2 tiny given position ids ``(example, token)``."""
    return Gpt2(True), torch.randint(0, 50, (BATCH, 16)), torch.randint(0, 10, (BATCH,))


def cpu_seconds(fn: Callable[[], object]) -> float:
    """The least process CPU time of ``REPEATS`` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, object]:
    """Plain backward, per_example_dots auto and vmap, and the plan's ghost share."""
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def plain() -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def dots(method: str) -> Callable[[], object]:
        return lambda: per_example_dots(model, F.cross_entropy, x, y, reference=ref, method=method)

    plan = ghost_plan(model, x)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    ghost = sum(sizes[n] for n, e in plan.items() if e.path == "ghost")
    row: dict[str, object] = {
        "plain_backward_s": cpu_seconds(plain),
        "auto_s": cpu_seconds(dots("auto")),
        "vmap_s": cpu_seconds(dots("vmap")),
        "ghost_share": ghost / sum(sizes.values()),
        "vmap_params": [n for n, e in plan.items() if e.path == "vmap"],
    }
    row["auto_over_plain"] = row["auto_s"] / row["plain_backward_s"]  # type: ignore[operator]
    row["vmap_over_plain"] = row["vmap_s"] / row["plain_backward_s"]  # type: ignore[operator]
    return row


def main() -> None:
    """Measure every model and write ``timing.json``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = {}
    builds = {
        "cnn": cnn,
        "encoder": encoder,
        "gpt2_tiny": gpt2,
        "gpt2_tiny_position_ids": gpt2_positions,
    }
    for name, build in builds.items():
        rows[name] = measure(*build())
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}
        print(name, shown)
    meta = {
        "batch": BATCH,
        "threads": 1,
        "dtype": "float32",
        "clock": "time.process_time",
        "repeats": REPEATS,
        "torch": torch.__version__,
    }
    out = Path(__file__).with_name("timing.json")
    out.write_text(json.dumps({"meta": meta, "models": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
