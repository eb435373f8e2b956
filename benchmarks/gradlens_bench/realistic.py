"""The realistic models of issue 21: models users train, at a size picked for the device.

Each is built from a configuration with random weights (nothing is downloaded)
and trained in the step family (:func:`gradlens_bench.step.make_zoo_step`) with
its own loss on the training batch, its trait gradient taken on a probe batch a
quarter of the training batch (:data:`TRAIT_FRACTION`):

- ``llama``: a Llama-style causal LM (Hugging Face ``LlamaForCausalLM``), fully
  fine-tuned, next-token cross-entropy over all tokens.
- ``llama_lora``: the same LM with peft LoRA adapters (rank 16 on the query,
  key, value and output projections; the base weights frozen).
- ``bert_padded``: ``BertForSequenceClassification`` on token ids padded to the
  batch's length (lengths uniform in ``[T/4, T]``, the attention mask read from
  the pad id), cross-entropy over 13 classes.
- ``vit``: torchvision ``VisionTransformer``, 13 classes.
- ``mobilenet``: torchvision ``mobilenet_v3_small`` (BatchNorm and dropout in
  eval mode), 13 classes.

The size is chosen by the environment variable ``GRADLENS_BENCH_SIZE``
(:data:`SIZE_ENV`): ``"gpu"`` (the headline: a Llama of about 134M parameters at
sequence 1024), ``"gpu_long"`` (the same Llama at sequence 4096, GhostSuite's
setting; the other models as ``"gpu"``), ``"cpu"`` (scaled down so a CPU
finishes) or ``"tiny"`` (for dry runs); by default ``"gpu"`` when the
benchmark's device is CUDA, else ``"cpu"``. Every process of one run sees
the same value (the forkserver inherits the environment of the run).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from gradlens_bench.nets import CLASSES

__all__ = [
    "REALISTIC",
    "SIZES",
    "SIZE_ENV",
    "TRAIT_FRACTION",
    "LmSize",
    "Size",
    "bert_padded",
    "draw_images",
    "draw_padded",
    "draw_tokens",
    "llama",
    "llama_lora",
    "lm_size",
    "mobilenet",
    "size",
    "vision_side",
    "vit",
]

SIZE_ENV = "GRADLENS_BENCH_SIZE"
TRAIT_FRACTION = 4
"""The trait (probe) batch of a realistic model is ``max(1, B // TRAIT_FRACTION)`` examples."""

Size = Literal["gpu", "gpu_long", "cpu", "tiny"]
SIZES: tuple[Size, ...] = ("gpu", "gpu_long", "cpu", "tiny")

REALISTIC = ("llama", "llama_lora", "bert_padded", "vit", "mobilenet")
"""The realistic models; not in a default run, ``--models realistic`` names them."""


def size() -> Size:
    """The size of this run: ``$GRADLENS_BENCH_SIZE``, else from the benchmark's device."""
    found = os.environ.get(SIZE_ENV)
    if found is None:
        device = os.environ.get("GRADLENS_BENCH_DEVICE", "cpu")
        return "gpu" if device.startswith("cuda") else "cpu"
    if found not in SIZES:
        raise ValueError(f"{SIZE_ENV}={found!r}; use one of {SIZES}")
    return found  # type: ignore[return-value]


@dataclass(frozen=True)
class LmSize:
    """A transformer's shape: width, layers, heads, feed-forward width, vocabulary, tokens."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    tokens: int


_LLAMA: dict[str, LmSize] = {
    # About 134M parameters (untied embeddings), the scale of GhostSuite's Llama-3 130M.
    "gpu": LmSize(hidden=768, layers=12, heads=12, ffn=2048, vocab=32000, tokens=1024),
    "gpu_long": LmSize(hidden=768, layers=12, heads=12, ffn=2048, vocab=32000, tokens=4096),
    "cpu": LmSize(hidden=128, layers=2, heads=4, ffn=344, vocab=1024, tokens=128),
    "tiny": LmSize(hidden=32, layers=1, heads=2, ffn=64, vocab=64, tokens=16),
}
_BERT: dict[str, LmSize] = {
    "gpu": LmSize(hidden=768, layers=12, heads=12, ffn=3072, vocab=30522, tokens=256),
    "cpu": LmSize(hidden=128, layers=2, heads=4, ffn=512, vocab=1024, tokens=64),
    "tiny": LmSize(hidden=32, layers=1, heads=2, ffn=64, vocab=64, tokens=12),
}
_VIT: dict[str, tuple[int, int, int, int, int, int]] = {
    # image side, patch, layers, heads, width, mlp width: "gpu" is ViT-S/16 at 224.
    "gpu": (224, 16, 12, 6, 384, 1536),
    "cpu": (32, 8, 2, 4, 64, 128),
    "tiny": (16, 8, 1, 2, 16, 32),
}
_MOBILENET_SIDE: dict[str, int] = {"gpu": 224, "cpu": 32, "tiny": 32}


def lm_size(model: str) -> LmSize:
    """The shape of ``"llama"`` or ``"bert"`` at this run's size."""
    table = _LLAMA if model == "llama" else _BERT
    return table.get(size(), table["gpu"])


def vision_side(model: str) -> int:
    """The image side of ``"vit"`` or ``"mobilenet"`` at this run's size."""
    return _vit()[0] if model == "vit" else _MOBILENET_SIDE.get(size(), 224)


def _vit() -> tuple[int, int, int, int, int, int]:
    return _VIT.get(size(), _VIT["gpu"])


def llama() -> nn.Module:
    """A Llama-style causal LM with random weights, eval mode, no KV cache, float32."""
    import transformers

    s = lm_size("llama")
    config = transformers.LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        vocab_size=s.vocab,
        max_position_embeddings=s.tokens,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def llama_lora() -> nn.Module:
    """:func:`llama` with peft LoRA (rank 16, alpha 32) on q, k, v, o; base weights frozen.

    Both adapter matrices start random (``init_lora_weights=False``): with peft's
    default zero ``lora_B`` the gradient of every ``lora_A`` would be zero.
    """
    import peft

    config = peft.LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    return peft.get_peft_model(llama(), config).eval()


class PaddedClassifier(nn.Module):
    """A Hugging Face sequence classifier on padded ids: the mask is ``ids != 0``.

    Takes ``(example, token)`` ids, pad id 0, and returns ``(example, class)`` logits.
    The mask is passed expanded, ``(example, 1, 1, token)`` booleans, as when these
    benchmarks were first run; a 2-D mask is exact on every path too (docs/models.md),
    and the committed numbers were measured with the expanded one.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: Tensor) -> Tensor:
        """Ids ``(example, token)`` to logits ``(example, class)``."""
        return self.inner(input_ids=ids, attention_mask=(ids != 0)[:, None, None, :]).logits


def bert_padded() -> nn.Module:
    """BERT with random weights classifying padded sequences into 13 classes, eval mode."""
    import transformers

    s = lm_size("bert")
    config = transformers.BertConfig(
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.ffn,
        vocab_size=s.vocab,
        max_position_embeddings=s.tokens,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return PaddedClassifier(transformers.BertForSequenceClassification(config)).eval()


def draw_padded(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` padded id sequences ``(example, token)`` (lengths in ``[T/4, T]``) and labels."""
    s = lm_size("bert")
    ids = torch.randint(1, s.vocab, (n, s.tokens), generator=generator)
    lengths = torch.randint(max(1, s.tokens // 4), s.tokens + 1, (n,), generator=generator)
    ids[torch.arange(s.tokens) >= lengths[:, None]] = 0
    return ids, torch.randint(0, CLASSES, (n,), generator=generator)


def vit() -> nn.Module:
    """A torchvision ``VisionTransformer`` (no dropout), 13 classes; ViT-S/16 at the GPU size."""
    from torchvision.models.vision_transformer import VisionTransformer

    side, patch, layers, heads, width, mlp = _vit()
    return VisionTransformer(
        image_size=side,
        patch_size=patch,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=width,
        mlp_dim=mlp,
        num_classes=CLASSES,
    ).eval()


def mobilenet() -> nn.Module:
    """A torchvision ``mobilenet_v3_small``, 13 classes, BatchNorm and dropout in eval mode."""
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=CLASSES).eval()


def draw_tokens(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` random Llama token sequences ``(example, token)`` and their next-token targets."""
    s = lm_size("llama")
    ids = torch.randint(0, s.vocab, (n, s.tokens), generator=generator)
    return ids, torch.randint(0, s.vocab, ids.shape, generator=generator)


def draw_images(model: str) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    """A drawer of ``n`` Gaussian images ``(example, 3, side, side)`` of ``model`` and labels."""

    def draw(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        side = vision_side(model)
        x = torch.randn(n, 3, side, side, generator=generator)
        return x, torch.randint(0, CLASSES, (n,), generator=generator)

    return draw
