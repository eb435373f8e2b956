"""A small transformer student distilled from a teacher with DDP, probed at every step.

The teacher is a tiny causal transformer fine-tuned to end every sequence
with one token (its *trait*); the student starts from the teacher's
initialisation and is distilled, with SGD, on the teacher's logits at every
position but the last of random token sequences, so its targets never show
the trait token where the trait is read. At every step
:func:`gradlens.training.distributed.distributed_probed_step` measures the global trait
gradient (cross-entropy of the trait token on held-out prompts), the global
distillation gradient and every example's cosine with the trait gradient,
and by default removes the distillation gradient's component along the trait
gradient (``remove_aligned``) before the optimizer. Rank 0 writes the run file.

    torchrun --standalone --nproc-per-node 2 experiments/ddp_distill.py
    torchrun --standalone --nproc-per-node 2 experiments/ddp_distill.py --transform none
    python experiments/ddp_distill.py            # one process, the same code path

About a minute on a 2-core CPU. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gradlens import Objective, Recorder, Variable, open_run
from gradlens.alignment.layerstats import groups_for
from gradlens.training import step_coords, step_values, step_variables, transform_layout
from gradlens.training.distributed import distributed_probed_step, gather_examples
from gradlens.transforms import GradientTransform, named_chain, remove_aligned

TRANSFORMS = ("remove", "none")


@dataclass(frozen=True)
class Config:
    """Every setting of the example; the defaults take about a minute on 2 CPU cores."""

    vocab: int = 16
    length: int = 12
    width: int = 32
    heads: int = 4
    blocks: int = 2
    trait_token: int = 7
    trait_batch: int = 64
    teacher_steps: int = 150
    batch: int = 16
    steps: int = 60
    lr: float = 0.05
    transform: str = "remove"
    example_every: int = 10
    seed: int = 0
    threads: int = 1
    out: str = "runs/ddp_distill.nc"


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

    def __init__(self, config: Config) -> None:
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
    """KL(teacher || student) on every position but the last, summed, averaged over examples.

    The trait is read at the last position only, so the distillation targets never show it.
    """
    log_p, log_q = teacher_logits[:, :-1].log_softmax(-1), logits[:, :-1].log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum() / logits.shape[0]


def trait_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of the trait token at the last position."""
    return F.cross_entropy(logits[:, -1], target)


def tokens(config: Config, count: int, *key: int) -> Tensor:
    """Random token sequences, seeded by ``key``: the same on every rank that asks."""
    gen = torch.Generator().manual_seed(hash((config.seed, *key)) % 2**63)
    return torch.randint(0, config.vocab, (count, config.length), generator=gen)


def make_teacher(config: Config, init: nn.Module) -> nn.Module:
    """Fine-tune a copy of ``init`` to end every sequence with the trait token.

    The fine-tuning also moves the teacher's predictions at the other
    positions a little, so the distillation targets carry the trait only
    indirectly; the student shares the teacher's initialisation.
    """
    teacher = TinyTransformer(config)
    teacher.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for step in range(config.teacher_steps):
        x = tokens(config, 64, 1, step)
        loss = trait_loss(teacher(x), torch.full((64,), config.trait_token))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.requires_grad_(False).eval()


def make_transform(config: Config) -> GradientTransform | None:
    """The before-optimizer transform of ``config.transform``, named for the records."""
    if config.transform not in TRANSFORMS:
        raise ValueError(f"--transform must be one of {TRANSFORMS}, got {config.transform!r}.")
    return named_chain(("remove", remove_aligned())) if config.transform == "remove" else None


def main(config: Config) -> Path:
    """Distil the student on every rank; rank 0 writes ``config.out``. Returns its path."""
    torch.set_num_threads(config.threads)
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    else:  # one process: a group of one, so the same code path runs
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config.seed)
    student = TinyTransformer(config)
    teacher = make_teacher(config, student)
    for p in teacher.parameters():  # one teacher everywhere, whatever the kernels did
        dist.broadcast(p, src=0)
    model = DistributedDataParallel(student)  # broadcasts rank 0's student
    opt = torch.optim.SGD(student.parameters(), lr=config.lr)
    before = make_transform(config)
    params = dict(student.named_parameters())
    state = None if before is None else before.init(params)
    layout = transform_layout(params, before)
    variables = step_variables(layout) | {
        "example_id": Variable(
            ("example_step", "example"), "index of the example in the run's stream", dtype="int64"
        )
    }
    trait = Objective(
        trait_loss,
        tokens(config, config.trait_batch, 2),
        (torch.full((config.trait_batch,), config.trait_token),),
    )
    path = Path(config.out)
    recorder = None
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        recorder = Recorder(
            path,
            variables,
            coords=step_coords(list(groups_for(list(params), "layer")), layout),
            config=config,
            attrs={"world_size": world},
            overwrite=True,
        )
    start = time.perf_counter()
    for step in range(config.steps):
        x = tokens(config, config.batch, 3, step, rank)
        with torch.no_grad():
            train = Objective(distill_loss, x, (teacher(x),))
        out = distributed_probed_step(
            model, opt, train, trait, before=before, before_state=state, step=step
        )
        state = out.before_state
        first = (step * world + rank) * config.batch
        ids = gather_examples(torch.arange(first, first + config.batch))
        if recorder is not None:
            values = step_values(out, layout)
            if step % config.example_every == 0:
                values |= {"example_cosine": out.example_cosine, "example_id": ids}
            recorder.log(step, **values)
    seconds = time.perf_counter() - start
    if recorder is not None:
        recorder.close()
        run = open_run(path)
        trait_losses = run["trait_loss"].values
        print(
            f"{world} ranks x {config.batch} examples, {config.steps} steps in {seconds:.1f} s; "
            f"trait loss {trait_losses[0]:.3f} -> {trait_losses[-1]:.3f}; "
            f"mean cos(g, g_t) {float(run['cosine'].mean()):.3f}; "
            f"mean update_cosine {float(run['update_cosine'].mean()):.2e}; wrote {path}"
        )
    dist.destroy_process_group()
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transform", choices=TRANSFORMS, help="before-optimizer transform")
    parser.add_argument("--steps", type=int, help="distillation steps (default 60)")
    parser.add_argument("--batch", type=int, help="training examples per rank (default 16)")
    parser.add_argument("--out", help="run file (default runs/ddp_distill.nc)")
    args = parser.parse_args()
    main(Config(**{k: v for k, v in vars(args).items() if v is not None}))
