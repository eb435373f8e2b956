"""Models on which size-based ghost eligibility went silently wrong (float64, for the tests).

Every model takes ``(example, ...)`` inputs and returns ``(example, CLASSES)``
logits, so :func:`tests.models.loop_grads` is their reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSES = 3


class SequenceFirst(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=False)`` fed ``(token, example, d)``."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.0)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x.transpose(0, 1)).mean(dim=0))


class TimeMajor(nn.Module):
    """Linear layers on a time-major ``(token, example, d)`` tensor."""

    def __init__(self, d: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x.transpose(0, 1)))).mean(dim=0)


class SharedWeight(nn.Module):
    """Two ``nn.Linear`` modules holding one weight (each its own bias)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, d)
        self.second.weight = self.first.weight
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.second(torch.tanh(self.first(x))))


class TiedEmbedding(nn.Module):
    """Token embedding, a linear layer, and logits against the embedding table."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(CLASSES, d)
        self.mid = nn.Linear(d, d)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mid(self.embed(tokens)))  # (example, token, d)
        return (h @ self.embed.weight.T).mean(dim=1)


class FunctionalReuse(nn.Module):
    """An ``nn.Linear`` weight also read functionally, ``h @ lin.weight``."""

    def __init__(self, d: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inp(x)) @ self.inp.weight)


class TableLookup(nn.Module):
    """A linear layer applied to a parameter table and one to a buffer, beside the examples."""

    def __init__(self, rows: int, d: int = 4) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, d))
        self.register_buffer("keys", torch.randn(rows, d))
        self.key_proj = nn.Linear(d, d)
        self.table_proj = nn.Linear(d, d)
        self.inp = nn.Linear(d, d)
        self.head = nn.Linear(rows, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        keys = self.key_proj(self.keys) + torch.tanh(self.table_proj(self.table))
        keys = keys - keys.mean(dim=0)  # centring the table (not the examples) is fine
        return self.head(torch.tanh(self.inp(x)) @ keys.T)


class BatchCentred(nn.Module):
    """A forward that centres over the batch: it mixes examples."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x - x.mean(dim=0, keepdim=True))


def make(kind: str, batch: int = 4, tokens: int | None = None) -> tuple[nn.Module, Tensor, Tensor]:
    """``(model, inputs, labels)`` in float64; ``tokens`` defaults to ``batch``, the coincidence."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tokens = batch if tokens is None else tokens
    model = {
        "sequence_first": SequenceFirst,
        "time_major": TimeMajor,
        "shared_weight": SharedWeight,
        "tied_embedding": TiedEmbedding,
        "functional_reuse": FunctionalReuse,
        "table_lookup": lambda: TableLookup(rows=batch),
        "batch_centred": BatchCentred,
    }[kind]().double()
    if kind == "tied_embedding":
        inputs = torch.randint(0, CLASSES, (batch, tokens), generator=gen)
    elif kind in ("sequence_first", "time_major"):
        inputs = torch.randn(batch, tokens, 4, generator=gen, dtype=torch.float64)
    else:
        inputs = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
    return model, inputs, torch.randint(0, CLASSES, (batch,), generator=gen)


ZOO = (
    "sequence_first",
    "time_major",
    "shared_weight",
    "tied_embedding",
    "functional_reuse",
    "table_lookup",
)


# Models with factored forms beyond nn.Linear (issue 9): every parameter of these
# is checked against the float64 loop, and the plan's path for each is pinned.


class Convs2d(nn.Module):
    """Conv2d: every padding mode, ``padding="same"``, stride, dilation, groups; InstanceNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(
            4, 4, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular"
        )
        self.same = nn.Conv2d(4, 6, (2, 3), padding="same", padding_mode="replicate", groups=2)
        self.zeros = nn.Conv2d(6, 3, 2, stride=(1, 2), padding=(1, 0), bias=False)
        self.instance = nn.InstanceNorm2d(6, affine=True)
        self.head = nn.Linear(3, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        for conv in (self.reflect, self.circular, self.same):
            x = torch.tanh(conv(x))
        x = torch.tanh(self.zeros(self.instance(x)))
        return self.head(x.mean(dim=(2, 3)))


class Convs1d(nn.Module):
    """Conv1d variants; ``padding="same"`` with an odd total padding pads one more on the right."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.same = nn.Conv1d(4, 4, 2, padding="same", groups=4)
        self.dilated = nn.Conv1d(4, 2, 3, dilation=2, padding=1, padding_mode="circular")
        self.head = nn.Linear(2, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.first(x))
        x = torch.tanh(self.same(x))
        return self.head(self.dilated(x).mean(dim=2))


class Embeddings(nn.Module):
    """Embedding tables with ``padding_idx`` (one negative) and repeated ids; a time-major one."""

    def __init__(self, vocab: int = 5, d: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d, padding_idx=0)
        self.other = nn.Embedding(vocab, d, padding_idx=-1)
        self.time_major = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.tokens(ids) + self.other(ids.flip(1)))
        h = h * self.time_major(ids.transpose(0, 1)).transpose(0, 1)
        return self.head(h).mean(dim=1)


class MaxNormEmbedding(nn.Module):
    """``max_norm`` renormalises the table in place in the forward: no factored form."""

    def __init__(self, vocab: int = 5, d: int = 4) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, d, max_norm=1.0)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.table(ids)).mean(dim=1)


class Norms(nn.Module):
    """GroupNorm, InstanceNorm (batch and running stats), eval BatchNorm, LayerNorm, RMSNorm."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, c, 3, padding=1)
        self.group = nn.GroupNorm(2, c)
        self.instance = nn.InstanceNorm1d(c, affine=True)
        self.running = nn.InstanceNorm1d(c, affine=True, track_running_stats=True)
        self.batch = nn.BatchNorm1d(c)
        self.layer = nn.LayerNorm(c)
        self.rms = nn.RMSNorm(c)
        self.head = nn.Linear(c, CLASSES)
        for stats in (self.running, self.batch):
            stats.running_mean.uniform_(-0.5, 0.5)
            stats.running_var.uniform_(0.5, 2.0)
        for norm in (self.group, self.instance, self.running, self.batch, self.layer, self.rms):
            nn.init.normal_(norm.weight, 1.0, 0.3)
            if getattr(norm, "bias", None) is not None:
                nn.init.normal_(norm.bias, 0.0, 0.3)
        self.running.eval()
        self.batch.eval()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.instance(torch.tanh(self.conv(x))))  # shift-free per channel
        h = self.batch(self.running(torch.tanh(self.group(h))))
        h = self.rms(torch.tanh(self.layer(h.transpose(1, 2))))
        return self.head(h.mean(dim=1))


class Attention(nn.Module):
    """``nn.MultiheadAttention``: self-attention batch-first, cross-attention sequence-first."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, 2, bias=False)
        self.memory = nn.Linear(d, d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.self_attn(x, x, x)  # (example, token, d); need_weights=True path
        h = h.transpose(0, 1)
        memory = torch.tanh(self.memory(x)).transpose(0, 1)
        h, _ = self.cross_attn(h, memory, memory, need_weights=False)
        return self.head(h.mean(dim=0))


class EncoderBatchFirst(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=True)`` (norm first), ``(example, token, d)``."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d, 2, dim_feedforward=6, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class PeftStyleLora(nn.Module):
    """A LoRA adapter laid out as peft's: ``base_layer``, ``lora_A``, ``lora_B`` are nn.Linear."""

    def __init__(self, d: int = 4, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d, d)
        self.lora_A = nn.Linear(d, rank, bias=False)
        self.lora_B = nn.Linear(rank, d, bias=False)
        nn.init.normal_(self.lora_B.weight)  # peft starts B at zero; any value must be exact
        self.scaling = 0.5

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


class FunctionalLora(nn.Module):
    """A hand-written LoRA, ``x @ A.T @ B.T``: no factored form for ``A`` and ``B``."""

    def __init__(self, d: int = 4, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d, d)
        self.lora_a = nn.Parameter(torch.randn(rank, d))
        self.lora_b = nn.Parameter(torch.randn(d, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


class Lora(nn.Module):
    """Both LoRA styles on ``(example, token, d)``."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.peft = PeftStyleLora(d)
        self.functional = FunctionalLora(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.functional(torch.tanh(self.peft(x)))).mean(dim=1))


class Gpt2Logits(nn.Module):
    """A tiny random HF GPT-2 (tied ``wte``/``lm_head``) returning its last token's logits."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        self.gpt = transformers.GPT2LMHeadModel(cfg).eval()

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt(input_ids=ids, use_cache=False).logits[:, -1, :CLASSES]


class SharedUses(nn.Module):
    """One table read by F.embedding (padding_idx) and F.linear, one Linear applied in two
    layouts, and one bias shared by a Linear and a LayerNorm: each read adds to the gradient."""

    def __init__(self, vocab: int = 6, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=1)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.norm.bias = self.mix.bias
        self.head = nn.Linear(vocab, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))  # (example, token, d)
        h = self.mix(h.transpose(0, 1)).transpose(0, 1)  # again, time-major
        logits = F.linear(self.norm(h), self.embed.weight)  # tied to the table
        return self.head(logits.mean(dim=1))


class Broadcasts(nn.Module):
    """Parameters broadcast over the examples (issue 21): a position table added, a bias viewed
    into a channels-first layout and subtracted, an HF-style RMSNorm weight (``weight * h``),
    a scale used twice (``h * s`` and ``s * h``) and a sequence-first table added (its example
    axis 1): each is exact through the broadcast form."""

    def __init__(self, d: int = 4, tokens: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(tokens, d))
        self.channel_bias = nn.Parameter(torch.randn(d))
        self.rms_weight = nn.Parameter(torch.randn(d))
        self.scale = nn.Parameter(torch.randn(d))
        self.seq_pos = nn.Parameter(torch.randn(tokens, 1, d))
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = torch.tanh(self.inp(x)) + self.pos[:t]  # (example, token, d)
        h = (h.transpose(1, 2) - self.channel_bias.view(1, -1, 1)).transpose(1, 2)
        h32 = h.to(torch.float32)  # as LlamaRMSNorm: statistics in float32, cast back
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.rms_weight * h32.to(h.dtype)
        h = torch.tanh(h * self.scale) + self.scale * h
        h = h.transpose(0, 1) + self.seq_pos[:t]  # (token, example, d)
        return self.head(torch.tanh(h).mean(dim=0))


class Llama(nn.Module):
    """A tiny random HF ``LlamaForCausalLM`` (RMSNorm weights read by ``mul``), last logits."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
        )
        self.llama = transformers.LlamaForCausalLM(cfg).eval()
        for module in self.llama.modules():  # random norm weights: any value must be exact
            if type(module).__name__ == "LlamaRMSNorm":
                nn.init.normal_(module.weight, 1.0, 0.3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.llama(input_ids=ids, use_cache=False).logits[:, -1, :CLASSES]


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` with queries, keys and values from three inputs (its
    ``in_proj_weight`` and ``in_proj_bias`` chunked in three, each read by ``F.linear``)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.keys = nn.Linear(d, d)
        self.values = nn.Linear(d, d)
        self.cross_kv = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, CLASSES)
        nn.init.normal_(self.cross_kv.in_proj_bias)  # torch starts it at zero

    def forward(self, x: Tensor) -> Tensor:
        k, v = torch.tanh(self.keys(x)), torch.sin(self.values(x))
        h, _ = self.cross_kv(x, k, v, need_weights=False)
        return self.head(h.mean(dim=1))


def vit() -> nn.Module:
    """A tiny torchvision ``VisionTransformer`` (``pos_embedding`` added, ``class_token``
    expanded to the batch and concatenated)."""
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=8,
        num_classes=CLASSES,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # torchvision starts both at zero; any value must be exact
        model.class_token.normal_(generator=gen)
        model.heads.head.weight.normal_(generator=gen)
    return model.eval()


def resnet() -> nn.Module:
    """torchvision ``resnet18`` in eval mode (BatchNorm with running statistics)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=CLASSES).eval()
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # running statistics as after training
            module.running_mean.uniform_(-0.1, 0.1, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


FORMS_ZOO = (
    "convs2d",
    "convs1d",
    "embeddings",
    "max_norm_embedding",
    "norms",
    "attention",
    "sequence_first",
    "encoder_batch_first",
    "lora",
    "shared_uses",
    "gpt2",
    "resnet",
    "broadcasts",
    "llama",
    "vit",
    "cross_attention",
)
"""Zoo entries for the factored forms (``make_forms``)."""


def make_forms(
    kind: str, batch: int = 4, tokens: int | None = None
) -> tuple[nn.Module, Tensor, Tensor]:
    """``(model, inputs, labels)`` in float64 for the :data:`FORMS_ZOO` entries."""
    if kind == "sequence_first":
        return make(kind, batch, tokens)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tokens = batch if tokens is None else tokens
    model = {
        "convs2d": Convs2d,
        "convs1d": Convs1d,
        "embeddings": Embeddings,
        "max_norm_embedding": MaxNormEmbedding,
        "norms": Norms,
        "attention": Attention,
        "encoder_batch_first": EncoderBatchFirst,
        "lora": Lora,
        "gpt2": Gpt2Logits,
        "shared_uses": SharedUses,
        "resnet": resnet,
        "broadcasts": Broadcasts,
        "llama": Llama,
        "vit": vit,
        "cross_attention": CrossAttention,
    }[kind]().double()
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    if kind in ("embeddings", "max_norm_embedding", "gpt2", "shared_uses", "llama"):
        vocab = {"gpt2": 50, "shared_uses": 6, "llama": 40}.get(kind, 5)
        inputs = torch.randint(0, vocab, (batch, tokens), generator=gen)
        if kind == "embeddings":
            inputs[:, :2] = torch.tensor([0, 4])  # both padding rows, and repeats, in each example
    elif kind == "convs2d":
        inputs = torch.randn(batch, 2, 7, 6, generator=gen, dtype=torch.float64)
    elif kind in ("convs1d", "norms"):
        channels = 3 if kind == "convs1d" else 2
        inputs = torch.randn(batch, channels, 9, generator=gen, dtype=torch.float64)
    elif kind == "resnet":
        inputs = torch.randn(batch, 3, 16, 16, generator=gen, dtype=torch.float64)
    elif kind == "vit":
        inputs = torch.randn(batch, 3, 8, 8, generator=gen, dtype=torch.float64)
    else:
        inputs = torch.randn(batch, tokens, 4, generator=gen, dtype=torch.float64)
    return model, inputs, labels
