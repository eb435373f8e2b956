"""The networks the benchmark builds, and the losses that belong to them.

Every probe and zoo network ends in 13 logits, the class count of the
experiment, except GPT-2, whose logits are next-token scores. The student of
the step benchmark is :func:`init_mlp`, the experiment's MLP with its reference
initialisation. The DDP entry runs a plain MLP (:func:`ddp_mlp`) and a tiny
causal transformer distilled from a copy (:class:`TinyTransformer`, the
network of ``experiments/ddp_distill.py``, copied so the benchmark imports no
experiment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLASSES",
    "GPT2_TOKENS",
    "GPT2_VOCAB",
    "MeanOverTokens",
    "TinyConfig",
    "TinyTransformer",
    "cnn",
    "ddp_mlp",
    "distill_loss",
    "encoder",
    "gpt2_tiny",
    "init_mlp",
    "last_token_loss",
    "lm_loss",
    "mlp",
    "resnet10",
    "small_cnn",
    "tokens_mlp",
]

CLASSES = 13
GPT2_VOCAB = 128
GPT2_TOKENS = 32


class MeanOverTokens(nn.Module):
    """Average ``(example, token, d)`` over ``token``: a module so libraries can see it."""

    def forward(self, x: Tensor) -> Tensor:
        """Shape ``(example, token, d)`` to ``(example, d)``."""
        return x.mean(dim=1)


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in pairwise(widths):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, CLASSES),
    )


def tokens_mlp(d: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, CLASSES), MeanOverTokens())


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of ``(example, token, vocab)`` logits, mean over all tokens."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def gpt2_tiny() -> nn.Module:
    """Hugging Face GPT-2 with 2 layers of width 64, random weights, eval mode, no KV cache.

    The cache is switched off here so that the plain baseline builds none
    either (gradlens switches it off while it probes).
    """
    import transformers

    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=GPT2_VOCAB,
        n_positions=GPT2_TOKENS,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, CLASSES),
    )


def encoder(d: int = 64) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
        MeanOverTokens(),
        nn.Linear(d, CLASSES),
    ).eval()


def resnet10() -> nn.Module:
    """The ResNet of torchvision with one BasicBlock per stage (a ResNet-10), BatchNorm in eval."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES).eval()


def init_mlp(sizes: Sequence[int], *, seed: int) -> nn.Sequential:
    """A ReLU MLP with weights from N(0, 1/d_in) and zero biases: the experiment's student.

    The same draws as the experiment's own builder, so a teacher and a student
    built from one seed share their initialisation and the step benchmark's
    numbers mean what they meant.

    Args:
        sizes: Layer widths, input first, e.g. ``(784, 256, 256, 13)``.
        seed: Seed of the initialisation.

    Returns:
        ``Linear, ReLU, ..., Linear`` with parameter names ``"0.weight"``, ``"0.bias"``, ...
    """
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {tuple(sizes)}.")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in pairwise(sizes):
        linear = nn.Linear(d_in, d_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
            linear.bias.zero_()
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def ddp_mlp() -> nn.Module:
    """The DDP entry's MNIST-sized MLP, 784-256-256-10, torch's default initialisation."""
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


@dataclass(frozen=True)
class TinyConfig:
    """The shape of :class:`TinyTransformer`: the defaults of ``experiments/ddp_distill.py``."""

    vocab: int = 16
    length: int = 12
    width: int = 32
    heads: int = 4
    blocks: int = 2
    trait_token: int = 7


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, written with ``nn.Linear`` layers."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        """``(example, token, width) -> (example, token, width)``."""
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(w // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj(torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Token and position embeddings, causal blocks, a final norm and a logit head."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.width)
        self.position = nn.Parameter(0.02 * torch.randn(config.length, config.width))
        self.blocks = nn.Sequential(
            *[Block(config.width, config.heads) for _ in range(config.blocks)]
        )
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(example, token)`` ids -> ``(example, token, vocab)`` logits."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def distill_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) on every position but the last, summed, averaged over examples."""
    log_p, log_q = teacher_logits[:, :-1].log_softmax(-1), logits[:, :-1].log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum() / logits.shape[0]


def last_token_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The trait loss: cross-entropy of the trait token at the last position."""
    return F.cross_entropy(logits[:, -1], target)
