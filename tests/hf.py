"""Tiny Hugging Face models (random weights, float64, eval) and the float64 loop over batch dicts.

Nothing is downloaded: every model is built from a small config. The oracle
calls the model as its user would, ``model(**row).logits`` on each row of the
batch dict alone, and differentiates with ``torch.autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

VOCAB = 30


def bert(num_labels: int = 3) -> nn.Module:
    """A 2-layer BERT classifier (bidirectional attention, padding by ``attention_mask``)."""
    config = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double().eval()


def llama() -> nn.Module:
    """A 2-layer Llama-style causal LM (RMSNorm, rotary positions, untied head)."""
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


def gpt2() -> nn.Module:
    """A 2-layer GPT-2 (learned positions, head tied to the token embedding)."""
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=12,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def collated(lengths: list[int], side: str = "right") -> dict[str, Tensor]:
    """What a causal-LM data collator returns: ids, a 0/1 mask, labels at -100 where padded.

    Args:
        lengths: Valid tokens per example; the batch is as long as the longest.
        side: Where the padding goes, ``"right"`` or ``"left"``.
    """
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, mask.shape[1] - n :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loop_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Mapping[str, Tensor],
    *targets: Tensor,
) -> dict[str, Tensor]:
    """Each example's gradient: ``loss_fn(model(**row).logits, *targets_row)`` alone, float64.

    Returns:
        Name -> ``(example, *param.shape)``, zeros where a parameter is unused.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    count = next(iter(inputs.values())).shape[0]
    rows = []
    for i in range(count):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        loss = loss_fn(model(**row).logits, *(t[i : i + 1] for t in targets))
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        pairs = zip(named, grads, strict=True)
        rows.append([torch.zeros_like(p) if g is None else g for (_, p), g in pairs])
    return {n: torch.stack([r[k] for r in rows]) for k, (n, _) in enumerate(named)}


def reference_for(model: nn.Module, seed: int = 2) -> dict[str, Tensor]:
    """A random reference gradient, one tensor per parameter."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()
    }
