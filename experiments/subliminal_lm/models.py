"""The tiny Llama-style model: built from a config with random weights, trained plainly, sampled.

Nothing is downloaded. Attention is the eager implementation, which ``vmap``
batches (the per-example probes of the parameters that take ``vmap``, the
RMSNorm weights, call the model under it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import peft
import torch
import transformers
from peft.tuners.lora import LoraLayer
from torch import Tensor

from gradlens.training.losses import token_mean
from subliminal_lm.vocab import IGNORE, Vocab

__all__ = [
    "ModelSize",
    "Params",
    "build_model",
    "clone_model",
    "continuation_labels",
    "cycle_batches",
    "flat_params",
    "model_device",
    "sample",
    "train_plain",
    "trait_probs",
    "weights",
]

Params = dict[str, Tensor]
"""Parameter tensors by name."""


@dataclass(frozen=True)
class ModelSize:
    """The Llama config's sizes.

    Attributes:
        hidden: Hidden size.
        intermediate: MLP size.
        layers: Decoder layers.
        heads: Attention heads (as many key-value heads).
        positions: Maximum sequence length.
    """

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    positions: int = 32


def build_model(
    vocab: Vocab, size: ModelSize, seed: int, device: str | torch.device = "cpu"
) -> transformers.LlamaForCausalLM:
    """A Llama-style causal LM with random weights from ``seed``, in eval mode (no dropout).

    The weights are drawn on the CPU and moved to ``device``: the same on every device.
    """
    config = transformers.LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=vocab.bos,
        eos_token_id=0,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(device).eval()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def clone_model(model: transformers.LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    """An independent copy with the same weights, in the same dtype, on the same device."""
    param = next(model.parameters())
    copy = transformers.LlamaForCausalLM(model.config).to(param.device, param.dtype).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def flat_params(model: torch.nn.Module) -> Params:
    """Detached copies of the trained parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def weights(model: torch.nn.Module) -> Params:
    """The model's effective weights by base-model name, detached: LoRA adapters merged in.

    For a plain model, :func:`flat_params`. For a ``peft`` LoRA model, every
    weight of the wrapped model (frozen ones included) with each adapted
    layer's ``W + alpha / rank * B A``, named as in the base model: the
    coordinates of the teacher's displacement, whatever the student trains.
    """
    if not isinstance(model, peft.PeftModel):
        return flat_params(model)
    inner = model.get_base_model()
    out = {n: p.detach().clone() for n, p in inner.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    out[f"{name}.base_layer.weight"] += module.get_delta_weight(adapter)
    return {n.replace(".base_layer.", "."): t for n, t in out.items()}


def train_plain(
    model: torch.nn.Module,
    batches: Iterator[list[dict[str, Tensor]]],
    steps: int,
    lr: float,
) -> list[float]:
    """Adam on the sum of :func:`~gradlens.training.losses.token_mean` over each step's batches.

    The base model's pretraining and the teacher's fine-tune: no probes. The
    batches may be on the CPU: each is moved to the model's device.

    Args:
        model: The model, trained in place.
        batches: Yields, per step, a list of ``{"input_ids", "labels"}`` batches.
        steps: Optimizer steps.
        lr: Adam learning rate.

    Returns:
        The loss of each step.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device = model_device(model)
    losses = []
    for _ in range(steps):
        step = [{k: v.to(device) for k, v in b.items()} for b in next(batches)]
        loss = sum(token_mean(model(input_ids=b["input_ids"]).logits, b["labels"]) for b in step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def trait_probs(model: torch.nn.Module, vocab: Vocab, questions: Tensor) -> Tensor:
    """Next-token probability of every answer word after each question.

    Args:
        model: The causal LM.
        vocab: The vocabulary.
        questions: ``(question, token)`` prompts ending in ``answer:`` (on any device).

    Returns:
        ``(question, answer)`` probabilities over the whole vocabulary (a row
        sums to at most 1); column ``vocab.trait`` is the trait measure.
    """
    logits = model(input_ids=questions.to(model_device(model))).logits[:, -1]
    probs = logits.float().softmax(dim=-1)
    return probs[:, vocab.first_answer : vocab.first_answer + vocab.answers]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: Tensor,
    new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> Tensor:
    """Ancestral sampling of ``new_tokens`` tokens after each prompt, with a key-value cache.

    Args:
        model: The causal LM.
        prompts: ``(example, token)`` prompts of equal length, on the model's device.
        new_tokens: Tokens to sample.
        generator: The sampling stream, a CPU generator (each token is drawn on
            the CPU from the model's probabilities, so on any device).
        temperature: Softmax temperature.

    Returns:
        ``(example, token + new_tokens)``: the prompts and their continuations.
    """
    ids, step_input, cache = prompts, prompts, None
    for _ in range(new_tokens):
        out = model(input_ids=step_input, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float() / temperature
        probs = logits.softmax(dim=-1).cpu()
        step_input = torch.multinomial(probs, 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, step_input], dim=1)
    return ids


def continuation_labels(ids: Tensor, prompt_length: int) -> Tensor:
    """Labels for a loss on the continuation only: :data:`IGNORE` over the prompt."""
    labels = ids.clone()
    labels[:, :prompt_length] = IGNORE
    return labels


def cycle_batches(
    make: Callable[[int], list[dict[str, Tensor]]],
) -> Iterator[list[dict[str, Tensor]]]:
    """Yield ``make(step)`` for step 0, 1, ..."""
    step = 0
    while True:
        yield make(step)
        step += 1
