"""The workloads the benchmark runs on: models with one batch each.

Every model is built from a fixed seed and maps its inputs to 13 logits, the
class count of the experiment, except GPT-2, whose logits are next-token
scores. Three families: ``"probe"`` models come with a labelled batch, a loss and
a reference gradient (:class:`ProbeWorkload`); ``"step"`` models come with an
optimizer, a training batch and a trait batch (:class:`gradlens_bench.step.StepWorkload`):
the experiment's student with its teacher, and the zoo models (GPT-2 tiny, a
small CNN, a transformer encoder, a small ResNet), which are in both families;
``"ddp"`` models come as step workloads too, one per rank, and their methods
step them through ``DistributedDataParallel`` (:mod:`gradlens_bench.ddp`).
A method runs on the models of its own family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlens.probes import mean_grad
from gradlens_bench import realistic
from gradlens_bench.nets import (
    CLASSES,
    GPT2_TOKENS,
    GPT2_VOCAB,
    TinyConfig,
    TinyTransformer,
    cnn,
    ddp_mlp,
    encoder,
    gpt2_tiny,
    init_mlp,
    lm_loss,
    mlp,
    resnet10,
    small_cnn,
    tokens_mlp,
)
from gradlens_bench.realistic import TRAIT_FRACTION
from gradlens_bench.step import (
    SIZES,
    StepWorkload,
    make_ddp_step,
    make_step_workload,
    make_zoo_step,
    pick,
)

__all__ = [
    "DDP",
    "DEFAULT_MODELS",
    "MODELS",
    "REALISTIC",
    "ZOO",
    "Family",
    "ModelSpec",
    "ProbeWorkload",
    "Workload",
    "forward",
    "make_workload",
]

Family = Literal["probe", "step", "ddp"]


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: its families, how to build it and what one example is.

    Attributes:
        name: Registry key.
        description: For tables.
        build: Builds the model (from the global seed).
        example_shape: Shape of one input example.
        families: The method families it runs with.
        vocab: For token models, the vocabulary: inputs and targets are token
            ids of shape ``example_shape``; 0 for real-valued inputs with a
            class label each.
        loss_fn: The batch loss.
        output: The attribute holding the logits (gradlens's output selector),
            for models that do not return a tensor.
        drawer: Draws ``n`` examples and their targets itself, for models whose
            inputs are not described by ``example_shape`` and ``vocab`` (the
            realistic models, sized at run time: :mod:`gradlens_bench.realistic`).
        trait_batch: Examples of the trait batch of the step workload; ``0``
            means a quarter of the training batch (at least one).
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    example_shape: tuple[int, ...]
    families: tuple[Family, ...] = ("probe",)
    vocab: int = 0
    loss_fn: Callable[..., Tensor] = F.cross_entropy
    output: str | None = None
    drawer: Callable[[int, torch.Generator], tuple[Tensor, Tensor]] | None = None
    trait_batch: int = 64

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` examples and their targets (class labels, or next tokens for token models)."""
        if self.drawer is not None:
            return self.drawer(n, generator)
        if self.vocab:
            x = torch.randint(0, self.vocab, (n, *self.example_shape), generator=generator)
            return x, torch.randint(0, self.vocab, x.shape, generator=generator)
        x = torch.randn(n, *self.example_shape, generator=generator)
        return x, torch.randint(0, CLASSES, (n,), generator=generator)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "mlp",
            "experiment MLP 784-256-256-13",
            lambda: mlp([784, 256, 256, CLASSES]),
            (1, 28, 28),
        ),
        ModelSpec(
            "wide_mlp",
            "MLP 784-4x1024-13",
            lambda: mlp([784] + [1024] * 4 + [CLASSES]),
            (1, 28, 28),
        ),
        ModelSpec("cnn", "2 conv (16, 32) + linear on 1x28x28", cnn, (1, 28, 28)),
        ModelSpec("tokens", "(B,16,128): Linear-ReLU-Linear, mean over T", tokens_mlp, (16, 128)),
        ModelSpec(
            "mnist_step",
            "student step: MLP 784-256-256-13, KL on logits 10..12, Adam, 1024 probe images",
            lambda: init_mlp(SIZES, seed=0),
            (784,),
            families=("step",),
        ),
        ModelSpec(
            "gpt2_tiny",
            f"HF GPT-2, 2 layers, width 64, vocab {GPT2_VOCAB}, {GPT2_TOKENS} tokens, LM loss",
            gpt2_tiny,
            (GPT2_TOKENS,),
            families=("probe", "step"),
            vocab=GPT2_VOCAB,
            loss_fn=lm_loss,
            output="logits",
        ),
        ModelSpec(
            "small_cnn",
            "2 x (conv 3x3, GroupNorm, ReLU, pool) (16, 32) + linear on 3x32x32",
            small_cnn,
            (3, 32, 32),
            families=("probe", "step"),
        ),
        ModelSpec(
            "encoder",
            "(B,16,64): 2 nn.TransformerEncoderLayer (4 heads, ff 128), mean, linear",
            encoder,
            (16, 64),
            families=("probe", "step"),
        ),
        ModelSpec(
            "resnet",
            "torchvision ResNet-10 (BasicBlock x [1,1,1,1], BatchNorm eval) on 3x32x32",
            resnet10,
            (3, 32, 32),
            families=("probe", "step"),
        ),
        ModelSpec(
            "ddp_mlp",
            "DDP step: MLP 784-256-256-10, MSE to random targets, SGD, trait batch 64",
            ddp_mlp,
            (784,),
            families=("ddp",),
        ),
        ModelSpec(
            "ddp_transformer",
            "DDP step: tiny causal transformer (2 blocks, width 32, 12 tokens) distilled "
            "from a copy, SGD, trait batch 64",
            lambda: TinyTransformer(TinyConfig()),
            (TinyConfig.length,),
            families=("ddp",),
        ),
        ModelSpec(
            "llama",
            "HF LlamaForCausalLM from a config (about 134M parameters and 1024 tokens on a GPU), "
            "full fine-tuning, LM loss",
            realistic.llama,
            (),
            families=("step",),
            loss_fn=lm_loss,
            output="logits",
            drawer=realistic.draw_tokens,
            trait_batch=0,
        ),
        ModelSpec(
            "llama_lora",
            "the same Llama with peft LoRA (r=16 on q, k, v, o; base frozen), LM loss",
            realistic.llama_lora,
            (),
            families=("step",),
            loss_fn=lm_loss,
            output="logits",
            drawer=realistic.draw_tokens,
            trait_batch=0,
        ),
        ModelSpec(
            "bert_padded",
            "HF BertForSequenceClassification on padded ids (lengths T/4..T, mask from pad id)",
            realistic.bert_padded,
            (),
            families=("step",),
            drawer=realistic.draw_padded,
            trait_batch=0,
        ),
        ModelSpec(
            "vit",
            "torchvision VisionTransformer (ViT-S/16 at 224 on a GPU)",
            realistic.vit,
            (),
            families=("step",),
            drawer=realistic.draw_images("vit"),
            trait_batch=0,
        ),
        ModelSpec(
            "mobilenet",
            "torchvision mobilenet_v3_small (BatchNorm eval; 224x224 on a GPU)",
            realistic.mobilenet,
            (),
            families=("step",),
            drawer=realistic.draw_images("mobilenet"),
            trait_batch=0,
        ),
    )
}

ZOO = ("gpt2_tiny", "small_cnn", "encoder", "resnet")
"""Models of common architectures (issue 9); not in a default run, name them with ``--models``."""

DDP = ("ddp_mlp", "ddp_transformer")
"""The DDP entry (:mod:`gradlens_bench.world`); not in a default run: ``--models ddp``."""

REALISTIC = realistic.REALISTIC
"""The realistic models of issue 21 (:mod:`gradlens_bench.realistic`): ``--models realistic``."""

DEFAULT_MODELS = tuple(m for m in MODELS if m not in ZOO + DDP + REALISTIC)
"""What a run without ``--models`` measures."""


@dataclass(frozen=True)
class ProbeWorkload:
    """One model with one batch, on one device: what every probe method is given.

    ``output`` is the gradlens output selector (``None`` if the model returns
    a tensor); :func:`forward` applies it for the methods that call the model.
    """

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    inputs: Tensor
    targets: Tensor
    reference: dict[str, Tensor]
    output: str | None = None


Workload = ProbeWorkload | StepWorkload


def forward(w: ProbeWorkload, inputs: Tensor, model: nn.Module | None = None) -> Tensor:
    """The tensor the loss sees: ``model(inputs)`` (default ``w.model``), through ``w.output``."""
    return pick((model or w.model)(inputs), w.output)


def make_workload(
    model_name: str,
    batch: int,
    device: torch.device,
    seed: int = 0,
    family: Family | None = None,
    *,
    rank: int = 0,
) -> Workload:
    """Build the model and its batch of ``batch`` examples, all from ``seed``.

    For probe models the reference is the mean gradient of a separate batch of
    64 examples, as a probe would use a teacher's or a held-out batch's gradient.

    Args:
        model_name: A key of :data:`MODELS`.
        batch: Examples in the (training) batch.
        device: Where to put everything.
        seed: Seeds the model and the batches.
        family: The workload's family; default the model's first.
        rank: For the DDP family, the process's rank, which draws its own training batch.
    """
    spec = MODELS[model_name]
    family = family or spec.families[0]
    if family not in spec.families:
        raise ValueError(f"model {model_name!r} has no {family!r} workload; it has {spec.families}")
    if family == "step" and model_name == "mnist_step":
        return make_step_workload(batch, device, seed=seed)
    if family == "ddp":
        return make_ddp_step(model_name, batch, device, seed=seed, rank=rank)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = spec.build().to(device)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x, y = spec.draw(n, generator)
        return x.to(device), y.to(device)

    if family == "step":
        train, trait = draw(batch), draw(spec.trait_batch or max(1, batch // TRAIT_FRACTION))
        return make_zoo_step(model, spec.loss_fn, train, trait, spec.output)
    ref_x, ref_y = draw(64)
    reference = mean_grad(model, spec.loss_fn, ref_x, ref_y, output=spec.output)
    inputs, targets = draw(batch)
    return ProbeWorkload(model, spec.loss_fn, inputs, targets, reference, spec.output)
