"""One probed distillation step of every model of a stack: the experiment's objectives.

The step is gradlens's own (:func:`gradlens.training.stacked_probed_step`,
the stacked mode of the one step body); this module only says what the
experiment distils and probes: the losses of one model's batch, the trait
probes every model shares, and the names the experiment's files give the
records. Records beyond the core step's defaults, all asked of the core:

- ``distill_loss``: the distillation part of the loss (``train.parts``);
- ``heldout_trait_loss``, ``heldout_cosine``, ``heldout_update_cosine``: a
  held-out trait gradient ``g_h`` on labelled images that no transform ever
  sees (``heldout=``, at the steps asked);
- ``momentum_cosine``: cos(g_t, the optimizer's first moment after the step)
  (``momentum=True``; NaN for plain SGD);
- with a liminal term (``DistillBatch.base_logits``): ``liminal_kl_loss`` (the
  term's unweighted value), and cos(g_t, .) and the norm of the gradients of the
  distillation loss alone and of the term alone (``distill_cosine``,
  ``liminal_kl_cosine``, ``distill_norm``, ``liminal_kl_norm``; the core's
  ``part_gradients=True``, two more backwards), at every step, whatever the
  term's weight (the step's ``cosine`` is that of their weighted sum).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradlens.alignment.gradops import group_by_layer
from gradlens.training import Objective, StepResult, stacked_probed_step, weighted_sum
from gradlens.transforms import GradientTransform
from subliminal_mnist.losses import example_cross_entropy, example_kl
from subliminal_mnist.stacked import mlp_stack

__all__ = ["DistillBatch", "TraitProbes", "layer_names", "stacked_step"]


class DistillBatch(NamedTuple):
    """One distillation batch for every model.

    Attributes:
        inputs: ``(model, example, pixel)``.
        targets: The teacher's logits on the distilled slice, ``(model, example, logit)``.
        first: The first logit distilled (``num_classes`` for the auxiliary logits, 0 for all).
        base_logits: The base model's logits for a liminal term on its first
            ``k`` logits, ``(model, example, k)``: the term is taken over those
            logits (``k`` = the class logits, or all of them), or ``None``.
        liminal_weight: The liminal term's weight at this step.
        temperature: The liminal term's temperature ``T``; the term is
            ``T^2 KL(softmax(base / T) || softmax(student / T))``.
    """

    inputs: Tensor
    targets: Tensor
    first: int
    base_logits: Tensor | None = None
    liminal_weight: float = 0.0
    temperature: float = 1.0


class TraitProbes(NamedTuple):
    """The labelled images of the trait gradients, shared by every model.

    Attributes:
        images: Probe images, ``(example, pixel)``: the trait gradient ``g_t``.
        labels: ``(example,)``.
        heldout_images: Other images for the held-out trait gradient, or ``None``.
        heldout_labels: Their labels.
        shuffled_labels: The probe labels permuted, for the shuffled-label
            reference of a control condition, or ``None``.
    """

    images: Tensor
    labels: Tensor
    heldout_images: Tensor | None = None
    heldout_labels: Tensor | None = None
    shuffled_labels: Tensor | None = None


def _distill(first: int):
    def loss(out: Tensor, targets: Tensor, *rest: Tensor) -> Tensor:
        del rest
        return example_kl(out[..., first:], targets).mean()

    return loss


def _liminal(temperature: float):
    """``T^2 KL(base || student)`` over the logits the base logits cover (the first ``k``)."""

    def loss(out: Tensor, base_logits: Tensor) -> Tensor:
        t = temperature
        return example_kl(out[..., : base_logits.shape[-1]], base_logits, t).mean() * t**2

    return loss


def _liminal_part(temperature: float):
    term = _liminal(temperature)

    def loss(out: Tensor, targets: Tensor, base_logits: Tensor) -> Tensor:
        del targets
        return term(out, base_logits)

    return loss


def _class_ce(num_classes: int):
    def loss(out: Tensor, labels: Tensor) -> Tensor:
        return example_cross_entropy(out[..., :num_classes], labels).mean()

    return loss


def _shared(models: int, images: Tensor, labels: Tensor, loss: Any) -> Objective:
    """An objective whose batch every model shares (expanded, not copied)."""
    return Objective(
        loss, images.expand(models, *images.shape), (labels.expand(models, *labels.shape),)
    )


def train_objective(batch: DistillBatch) -> Objective:
    """The distillation loss of one model's batch, with a liminal term when weighted.

    With base logits its parts are ``distill`` and ``liminal_kl`` (the term
    unweighted), also at steps where the term's weight is 0 and the loss is
    the distillation loss alone.
    """
    distill = _distill(batch.first)
    if batch.base_logits is None:
        return Objective(distill, batch.inputs, (batch.targets,), parts={"distill": distill})
    parts = {"distill": distill, "liminal_kl": _liminal_part(batch.temperature)}
    targets = (batch.targets, batch.base_logits)
    if batch.liminal_weight <= 0:
        return Objective(distill, batch.inputs, targets, parts=parts)
    loss = weighted_sum(distill, _liminal(batch.temperature), batch.liminal_weight, split=1)
    return Objective(loss, batch.inputs, targets, parts=parts)


def stacked_step(
    params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    batch: DistillBatch,
    probes: TraitProbes,
    *,
    num_classes: int = 10,
    before: GradientTransform | None = None,
    before_state: Any = None,
    after: GradientTransform | None = None,
    after_state: Any = None,
    use_shuffled_reference: bool = False,
    heldout: bool = True,
    step: int | None = None,
) -> StepResult:
    """Take one probed optimizer step of every model on its distillation batch.

    Args:
        params: ``name -> (model, ...)`` leaf tensors with ``requires_grad``,
            the ones ``optimizer`` holds.
        optimizer: An elementwise ``torch.optim`` optimizer over ``params``.
        batch: The distillation batch.
        probes: The trait probe images (and held-out and shuffled-label ones).
        num_classes: The class logits (the trait).
        before: A :func:`gradlens.transforms.per_model` transform of ``g``.
        before_state: Its state.
        after: A ``per_model`` transform of the optimizer's update.
        after_state: Its state.
        use_shuffled_reference: The transforms act along the shuffled-label
            trait gradient instead of ``g_t`` (needs ``probes.shuffled_labels``).
        heldout: Measure the held-out records at this step (when ``probes``
            has held-out images); they cost one more forward and backward.
        step: The step number, for error messages.

    Returns:
        The core :class:`~gradlens.training.StepResult`, records on the CPU in
        float64 with ``train_loss_part`` named ``distill_loss``.
    """
    models = batch.inputs.shape[0]
    trait_loss = _class_ce(num_classes)
    reference = None
    if use_shuffled_reference:
        if probes.shuffled_labels is None:
            raise ValueError("use_shuffled_reference needs TraitProbes.shuffled_labels.")
        reference = _shared(models, probes.images, probes.shuffled_labels, trait_loss)
    held = None
    if heldout and probes.heldout_images is not None and probes.heldout_labels is not None:
        held = _shared(models, probes.heldout_images, probes.heldout_labels, trait_loss)
    result = stacked_probed_step(
        mlp_stack(params),
        optimizer,
        train_objective(batch),
        _shared(models, probes.images, probes.labels, trait_loss),
        before=before,
        before_state=before_state,
        after=after,
        after_state=after_state,
        step=step,
        method="matmul",
        heldout=held,
        reference=reference,
        momentum=True,
        part_gradients=batch.base_logits is not None,
    )
    records = {k: v.detach().to("cpu", torch.float64) for k, v in result.records.items()}
    parts = records.pop("train_loss_part")
    records["distill_loss"] = parts[..., 0]
    if batch.base_logits is not None:
        records["liminal_kl_loss"] = parts[..., 1]
        cosines, norms = records.pop("train_part_cosine"), records.pop("train_part_norm")
        records["distill_cosine"], records["liminal_kl_cosine"] = cosines[..., 0], cosines[..., 1]
        records["distill_norm"], records["liminal_kl_norm"] = norms[..., 0], norms[..., 1]
    return result._replace(records=records, example_cosine=result.example_cosine.detach().cpu())


def layer_names(params: Mapping[str, Tensor]) -> list[str]:
    """The layer names of a stack, in parameter order."""
    return list(group_by_layer(params))
