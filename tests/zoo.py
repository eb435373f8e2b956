"""Models on which size-based ghost eligibility went silently wrong (float64, for the tests).

Every model takes ``(example, ...)`` inputs and returns ``(example, CLASSES)``
logits, so :func:`tests.models.loop_grads` is their reference.
"""

from __future__ import annotations

import torch
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
