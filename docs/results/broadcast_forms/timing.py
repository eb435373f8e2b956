"""CPU cost of per_example_dots (auto, vmap) on the models issue 21 names, before and after.

The models whose plans had a few small parameters on ``vmap`` before the broadcast form:
a ViT (``class_token`` expanded, ``pos_embedding`` added), a Llama-style LM (RMSNorm
weights, ``weight * hidden``), ``nn.MultiheadAttention`` cross-attention (``in_proj_weight``
split) and GPT-2 tiny with its default ``(1, token)`` position ids (``wpe``). Measured as
``docs/results/ghost_forms/timing.py`` measures (its ``measure``: one thread, float32,
B=256, least process CPU time of 3 runs after a warm-up). Run from the repository root,
with ``PYTHONPATH`` naming the checkout whose ``gradlens`` is timed::

    PYTHONPATH=$PWD python docs/results/broadcast_forms/timing.py after
    PYTHONPATH=/path/to/checkout/before python docs/results/broadcast_forms/timing.py before

writes ``timing_<label>.json`` beside this file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

import gradlens
from docs.results.ghost_forms.timing import BATCH, REPEATS, gpt2, measure


class Vit(nn.Module):
    """torchvision ``VisionTransformer``: 32x32 images, patch 8, 2 layers, width 64."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.vit = torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=4,
            hidden_dim=64,
            mlp_dim=128,
            num_classes=10,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(example, 3, 32, 32)`` -> ``(example, 10)``."""
        return self.vit(x)


class Llama(nn.Module):
    """HF ``LlamaForCausalLM`` from a config: 2 layers, width 64, the last token's 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.llama = transformers.LlamaForCausalLM(cfg).eval()

    def forward(self, ids: Tensor) -> Tensor:
        """``(example, token)`` ids -> ``(example, 10)``."""
        return self.llama(input_ids=ids, use_cache=False).logits[:, -1, :10]


class Cross(nn.Module):
    """Tokens attend to a memory computed from them: ``nn.MultiheadAttention``, cross."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.memory = nn.Linear(8, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        """``(example, token, 8)`` -> ``(example, 10)``."""
        memory = torch.tanh(self.memory(x))
        h, _ = self.attn(self.embed(x), memory, memory, need_weights=False)
        return self.head(h.mean(dim=1))


def main() -> None:
    """Measure every model and write ``timing_<label>.json``."""
    label = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (BATCH,))
    builds = {
        "vit": lambda: (Vit().eval(), torch.randn(BATCH, 3, 32, 32)),
        "llama": lambda: (Llama(), torch.randint(0, 128, (BATCH, 16))),
        "cross_attention": lambda: (Cross(), torch.randn(BATCH, 16, 8)),
        "gpt2_tiny": lambda: gpt2()[:2],
    }
    rows = {}
    for name, build in builds.items():
        model, x = build()
        rows[name] = measure(model, x, labels)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}
        print(name, shown, flush=True)
    commit = subprocess.run(
        ["git", "-C", str(Path(gradlens.__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    meta = {
        "label": label,
        "gradlens": str(Path(gradlens.__file__).parent),
        "commit": commit or "unknown",
        "batch": BATCH,
        "threads": 1,
        "dtype": "float32",
        "clock": "time.process_time",
        "repeats": REPEATS,
        "torch": torch.__version__,
    }
    out = Path(__file__).with_name(f"timing_{label}.json")
    out.write_text(json.dumps({"meta": meta, "models": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
