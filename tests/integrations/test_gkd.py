"""TRL's GKDTrainer (distillation): the callback and the mixin on the generalized JSD.

A tiny Llama student and teacher built from configs (random weights, nothing downloaded),
float64, off-policy (``lmbda=0``, ``seq_kd=False``: no generation, so the steps are
deterministic), prompts of different lengths masked with -100 so the examples have different
numbers of completion tokens, two micro-batches per optimizer step.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from gradlens import Objective
from gradlens.errors import GradientMismatchError
from gradlens.integrations import TrainerProbe
from gradlens.training.losses import token_weights
from gradlens.transforms import named_chain, remove_aligned
from tests.integrations.replay import assert_rows_match, replay

pytest.importorskip("trl")  # the dev extra installs it; see pyproject
from datasets import Dataset
from transformers import LlamaForCausalLM

with warnings.catch_warnings():  # trl.experimental warns on import that its API may change
    warnings.filterwarnings("ignore", "You are importing from 'trl.experimental'")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

from gradlens.integrations.hf import GradlensCallback, ProbedTrainerMixin, StepCounts, step_weights
from tests.integrations.test_trl import Seen, ids, model, tokenizer

MICRO, ACCUMULATE, STEPS, BETA = 2, 2, 2, 0.5
PROMPTS = [1, 3, 2, 4, 1, 2, 3, 1]  # prompt lengths: 5, 3, 4, 2, ... completion tokens

pytestmark = [
    # RMSNorm weights take vmap: sdpa, and F.kl_div in trl's loss, have no batching rule
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


def teacher() -> LlamaForCausalLM:
    net = model()
    torch.manual_seed(1)
    for p in net.parameters():
        p.data.normal_(0, 0.5)
    return net


def data() -> Dataset:
    x = ids(len(PROMPTS), seed=4)
    labels = x.clone()
    for row, n in zip(labels, PROMPTS, strict=True):
        row[:n] = -100
    return Dataset.from_dict({"input_ids": x.tolist(), "labels": labels.tolist()})


def collate(rows: list[dict[str, Any]]) -> dict[str, Tensor]:
    x = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": x, "attention_mask": torch.ones_like(x),
            "labels": torch.tensor([r["labels"] for r in rows])}  # fmt: skip


def jsd(logits: Tensor, teacher_logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """``mean_i w_i m_i``: ``m_i`` example i's mean over its completion tokens of trl's own
    generalized JSD (unreduced: its masking indexes by a boolean mask, which vmap cannot)."""
    terms = GKDTrainer.generalized_jsd_loss(
        logits[:, :-1], teacher_logits[:, :-1], beta=BETA, reduction="none"
    ).sum(-1)
    mask = labels[:, 1:] != -100
    means = (terms * mask).sum(1) / mask.sum(1).clamp_min(1)
    return (means * weights.to(means.dtype)).mean()


def objective(net: torch.nn.Module, batch: dict[str, Tensor], weights: Tensor) -> Objective:
    """The micro-batch for the per-example pass: the teacher's logits, the labels and the
    examples' weights as targets, its all-ones attention_mask left out."""
    assert bool((batch["attention_mask"] == 1).all())
    with torch.no_grad():
        target = net(input_ids=batch["input_ids"]).logits
    return Objective(jsd, {"input_ids": batch["input_ids"]}, (target, batch["labels"], weights))


def trait() -> Objective:
    x = ids(3, seed=5)
    return Objective(jsd, {"input_ids": x}, (teacher()(input_ids=x).logits.detach(), x,
                                             torch.ones(3, dtype=torch.float64)))  # fmt: skip


class RecordingGKD(GKDTrainer):
    def training_step(self, model: Any, inputs: Any, *args: Any) -> Tensor:
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args)


class ProbedGKD(ProbedTrainerMixin, RecordingGKD):
    pass


def config(tmp_path: Path, **changes: Any) -> GKDConfig:
    return GKDConfig(**{
        "output_dir": str(tmp_path), "per_device_train_batch_size": MICRO,
        "gradient_accumulation_steps": ACCUMULATE, "max_steps": STEPS, "learning_rate": 0.1,
        "optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
        "weight_decay": 0.0, "report_to": "none", "use_cpu": True, "logging_steps": 1,
        "save_strategy": "no", "disable_tqdm": True, "seed": 0, "bf16": False,
        "activation_checkpointing": False, "lmbda": 0.0, "seq_kd": False, "beta": BETA,
        **changes,
    })  # fmt: skip


def step_objectives(
    net: torch.nn.Module, batches: list[dict[str, Tensor]]
) -> list[list[Objective]]:
    """The recorded micro-batches, a step's each weighted by that step's counts."""
    steps = []
    for start in range(0, len(batches), ACCUMULATE):
        micro = batches[start : start + ACCUMULATE]
        counts = StepCounts(
            sum(len(b["input_ids"]) for b in micro),
            sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
        )
        steps.append([objective(net, b, step_weights(b["labels"], counts)) for b in micro])
    return steps


def test_the_weighted_loss_is_trls(tmp_path: Path) -> None:
    """Accumulated as the step's example mean, the weighted loss is what GKDTrainer.compute_loss
    backpropagates: trl's generalized_jsd_loss over the completion tokens, summed over the
    micro-batches, each over the step's num_items_in_batch."""
    student, net = model(), teacher()
    batches = [collate(data().select(range(i, i + MICRO)).to_list()) for i in (0, 2)]
    (step,) = step_objectives(net, batches)
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert len({int((b["labels"] != -100).sum()) for b in batches}) > 1  # unequal lengths
    want = sum(
        GKDTrainer.generalized_jsd_loss(
            student(input_ids=b["input_ids"]).logits[:, :-1],
            net(input_ids=b["input_ids"]).logits[:, :-1],
            b["labels"][:, 1:],
            beta=BETA,
            num_items_in_batch=items,
        )
        for b in batches
    )
    got = sum(o.loss_fn(student(**o.inputs).logits, *o.targets) for o in step) / len(step)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("examples", [False, True], ids=["callback", "mixin"])
def test_gkd_trainer_equals_probed_step(tmp_path: Path, examples: bool) -> None:
    student, net = model(), teacher()
    start = copy.deepcopy(student)
    before = named_chain(("remove", remove_aligned()))
    probe = TrainerProbe(trait(), before=before, output="logits")
    seen = Seen(probe)
    common = {"model": student, "teacher_model": net, "args": config(tmp_path),
              "train_dataset": data(), "data_collator": collate, "processing_class": tokenizer(),
              "callbacks": [seen]}  # fmt: skip
    if examples:
        trainer = ProbedGKD(
            **common, gradlens=GradlensCallback(probe),
            examples=lambda batch, step: objective(net, batch, step_weights(batch["labels"], step)),
        )  # fmt: skip
    else:
        trainer = RecordingGKD(**common)
        GradlensCallback(probe).add_to(trainer)
    trainer.batches = []
    trainer.train()
    assert len(trainer.batches) == ACCUMULATE * STEPS
    want = replay(
        start,
        step_objectives(net, trainer.batches),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        before=before,
        objective=lambda o: o,
        trait_objective=trait(),
    )
    checked = assert_rows_match(seen.rows, want, examples=examples)
    assert {"cosine", "layer_cosine", "update_cosine", "transform_coef"} <= set(checked)
    for p, q in zip(student.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def probed(tmp_path: Path, examples: Any, **changes: Any) -> ProbedGKD:
    trainer = ProbedGKD(
        model=model(), teacher_model=teacher(), args=config(tmp_path, **changes),
        train_dataset=data(), data_collator=collate, processing_class=tokenizer(),
        gradlens=GradlensCallback(TrainerProbe(trait(), output="logits")), examples=examples,
    )  # fmt: skip
    trainer.batches = []
    return trainer


def test_per_example_token_means_are_refused(tmp_path: Path) -> None:
    """Every example weighted the same (each its own token mean, as examples(batch) alone can
    give) is not GKD's loss when the examples' completions differ in length: the check says so."""
    net = teacher()
    trainer = probed(
        tmp_path, lambda batch: objective(net, batch, torch.ones(len(batch["labels"])))
    )
    with pytest.raises(GradientMismatchError, match="does not describe the trainer's gradient"):
        trainer.train()


def test_on_policy_is_refused(tmp_path: Path) -> None:
    """lmbda > 0 replaces the micro-batch after the per-example pass: refused before it."""
    net = teacher()
    trainer = probed(
        tmp_path,
        lambda batch, step: objective(net, batch, step_weights(batch["labels"], step)),
        lmbda=1.0,
    )
    with pytest.raises(ValueError, match="generates new completions"):
        trainer.train()


def test_step_weights_of_one_micro_batch_are_token_weights() -> None:
    labels = torch.tensor([[5, 1, 2, -100], [5, 1, -100, -100], [-100, -100, 4, 4]])
    one = StepCounts(3, int((labels[:, 1:] != -100).sum()))  # the step is this micro-batch
    torch.testing.assert_close(step_weights(labels, one), token_weights(labels))
    half = step_weights(labels[:1], StepCounts(6, 2 * one.items))  # of a step twice as long
    torch.testing.assert_close(half, token_weights(labels)[:1])
    with pytest.raises(ValueError, match="passed no num_items_in_batch"):
        step_weights(labels, StepCounts(3, None))


def test_a_short_last_step_is_weighted_by_its_own_examples(tmp_path: Path) -> None:
    """Seven examples in micro-batches of two: the second step has micro-batches of 2 and 1,
    so its weights use 3 examples (counted at get_batch_samples). The check at the optimizer
    step raises unless the examples' mean gradient is .grad (cosine and norms to 1e-4; with 4
    examples, as full steps have, the norms differ by 4/3 and it raises)."""
    net = teacher()
    trainer = probed(
        tmp_path,
        lambda batch, step: objective(net, batch, step_weights(batch["labels"], step)),
    )
    trainer.train_dataset = data().select(range(7))
    trainer.train()
    assert [len(b["input_ids"]) for b in trainer.batches] == [2, 2, 2, 1]
    assert trainer.gradlens_step_examples == 3
    assert trainer.gradlens.probe.recorder.dataset().sizes["step"] == STEPS
