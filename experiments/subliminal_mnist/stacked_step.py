"""One probed distillation step of every model of a stack at once.

The stacked counterpart of :func:`gradlens.training.probed_step` for the
experiment's MLPs: the same records, each with a leading ``model`` dim, from
batched matmuls instead of a loop over models. The per-example dots and squared
norms come from the factored (ghost) form of each linear layer,
``<b_i a_i^T, G> = b_i^T G a_i`` and ``||b_i a_i^T||^2 = ||b_i||^2 ||a_i||^2``,
with ``a_i`` the layer's input and ``b_i`` the gradient of example ``i``'s loss
with respect to the layer's output; the tests check them against
:func:`gradlens.probe_batch` on each model alone. Transforms act on each model
alone through :func:`gradlens.transforms.per_model` (each model with its own state).

Records beyond :func:`~gradlens.training.probed_step`'s:

- ``distill_loss``: the distillation part of the loss (without a liminal term);
- ``applied_cosine``: cos(g_t, the gradient handed to the optimizer), after any
  ``before`` transform (``cosine`` is measured before it);
- ``heldout_trait_loss``, ``heldout_cosine``, ``heldout_update_cosine``: the
  trait loss, cos(g_h, g) and cos(g_h, update) for a held-out trait gradient
  ``g_h`` on labelled images that no transform ever sees (at the steps asked);
- ``momentum_cosine``: cos(g_t, the optimizer's first moment after the step)
  (Adam's ``exp_avg``, SGD's ``momentum_buffer``; NaN for plain SGD).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradlens.alignment import QUANTILES
from gradlens.gradops import check_finite, group_by_layer, safe_divide
from gradlens.transforms import GradientTransform
from subliminal_mnist.losses import example_cross_entropy, example_kl
from subliminal_mnist.stacked import (
    model_dot,
    model_layer_dot,
    stack_forward,
    stack_forward_cached,
)

__all__ = [
    "DistillBatch",
    "StackedResult",
    "TraitProbes",
    "stacked_step",
]


class DistillBatch(NamedTuple):
    """One distillation batch for every model.

    Attributes:
        inputs: ``(model, example, pixel)``.
        targets: The teacher's logits on the distilled slice, ``(model, example, logit)``.
        first: The first logit distilled (``num_classes`` for the auxiliary logits, 0 for all).
        base_logits: The base model's class logits for a liminal term,
            ``(model, example, class)``, or ``None``.
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


class StackedResult(NamedTuple):
    """What :func:`stacked_step` measured.

    Attributes:
        records: ``name -> (model, ...)`` values on the CPU.
        example_cosine: ``cos(g_i, g_t)`` per model and example, ``(model, example)``.
        before_state: The new state of the ``before`` transform (every field with a
            leading ``model`` axis), ``None`` without one.
        after_state: The new state of the ``after`` transform.
    """

    records: dict[str, Tensor]
    example_cosine: Tensor
    before_state: Any
    after_state: Any


def _trait(
    params: Mapping[str, Tensor], images: Tensor, labels: Tensor, num_classes: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-model trait loss ``(model,)`` and gradient."""
    with torch.enable_grad():
        logits = stack_forward(params, images)[..., :num_classes]
        loss = example_cross_entropy(logits, labels).mean(-1)
        grads = torch.autograd.grad(loss.sum(), list(params.values()))
    return loss.detach(), dict(zip(params, grads, strict=True))


def _cosine(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return safe_divide(model_dot(a, b), (model_dot(a, a) * model_dot(b, b)).sqrt())


def _example_dots(
    inputs: Mapping[str, Tensor], out_grads: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``<grad_p L_i, reference_p>`` per parameter, each ``(model, example)``, factored form."""
    dots = {}
    for layer, a in inputs.items():
        b = out_grads[layer]
        dots[f"{layer}.weight"] = torch.einsum(
            "mbo,moi,mbi->mb", b, reference[f"{layer}.weight"], a
        )
        dots[f"{layer}.bias"] = torch.einsum("mbo,mo->mb", b, reference[f"{layer}.bias"])
    return {n: dots[n] for n in reference}


def _example_sq_norms(inputs: Mapping[str, Tensor], out_grads: Mapping[str, Tensor]) -> Tensor:
    total = 0
    for layer, a in inputs.items():
        b2 = out_grads[layer].square().sum(-1)
        total = total + b2 * (a.square().sum(-1) + 1.0)
    return total  # type: ignore[return-value]


def _moment(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    moments = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        value = state.get("exp_avg", state.get("momentum_buffer"))
        if value is None:
            return {}
        moments[name] = value
    return moments


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
    quantiles: Sequence[float] = QUANTILES,
    on_grads: Callable[[dict[str, Tensor]], None] | None = None,
) -> StackedResult:
    """Take one optimizer step of every model on its distillation batch, probing as it goes.

    The order is :func:`gradlens.training.probed_step`'s: trait gradient
    ``g_t``; training gradient ``g`` and per-example dots; ``before`` on ``g``
    (reference ``g_t``, extra ``example_dots``); the optimizer; ``after`` on the
    update (reference ``-g_t``); records.

    Args:
        params: ``name -> (model, ...)`` leaf tensors with ``requires_grad``,
            the ones ``optimizer`` holds.
        optimizer: An elementwise ``torch.optim`` optimizer over ``params``
            (Adam, SGD): it updates each model as if alone.
        batch: The distillation batch.
        probes: The trait probe images (and held-out and shuffled-label ones).
        num_classes: The class logits (the trait).
        before: Transform of the stacked ``g`` before the optimizer: a
            single-model transform wrapped in :func:`gradlens.transforms.per_model`,
            so that each model is transformed alone, with its own state.
        before_state: Its state (from ``before.init(params)`` or the last step).
        after: Transform of the optimizer's stacked update, likewise per model.
        after_state: Its state.
        use_shuffled_reference: The transforms act along the shuffled-label
            trait gradient instead of ``g_t`` (needs ``probes.shuffled_labels``).
        heldout: Measure the held-out records at this step (when ``probes``
            has held-out images); they cost one more forward and backward.
        step: The step number, for error messages.
        quantiles: Levels of the per-example cosine quantiles.
        on_grads: Called with the training gradient ``g`` (for tests).

    Returns:
        A :class:`StackedResult`.

    Raises:
        NonFiniteGradientError: If a gradient has NaN or infinite values.
        ValueError: The shuffled reference without shuffled labels.
    """
    names = list(params)
    models = batch.inputs.shape[0]
    old = {n: p.detach().clone() for n, p in params.items()}
    trait_loss, g_t = _trait(params, probes.images, probes.labels, num_classes)
    check_finite(g_t, step=step, what="trait gradient")
    reference = g_t
    if use_shuffled_reference:
        if probes.shuffled_labels is None:
            raise ValueError("use_shuffled_reference needs TraitProbes.shuffled_labels.")
        _, reference = _trait(params, probes.images, probes.shuffled_labels, num_classes)

    with torch.enable_grad():
        acts = stack_forward_cached(params, batch.inputs)
        distill = example_kl(acts.logits[..., batch.first :], batch.targets)
        per_example = distill
        if batch.base_logits is not None and batch.liminal_weight > 0:
            t = batch.temperature
            liminal = example_kl(acts.logits[..., :num_classes], batch.base_logits, t) * t**2
            per_example = distill + batch.liminal_weight * liminal
        loss = per_example.mean(-1)
        outputs = list(acts.outputs.values())
        grads = torch.autograd.grad(loss.sum(), [*params.values(), *outputs])
    g = dict(zip(names, grads[: len(names)], strict=True))
    check_finite(g, step=step, what="training gradient")
    size = batch.inputs.shape[1]
    out_grads = {
        layer: d.detach() * size for layer, d in zip(acts.outputs, grads[len(names) :], strict=True)
    }
    inputs = {layer: a.detach() for layer, a in acts.inputs.items()}
    param_dots = _example_dots(inputs, out_grads, g_t)
    dots = sum(param_dots.values())
    sq_norms = _example_sq_norms(inputs, out_grads)
    if on_grads is not None:
        on_grads(g)

    trait_layer_sq = model_layer_dot(g_t, g_t)
    trait_norm = trait_layer_sq.sum(1).sqrt()
    example_cosine = safe_divide(dots, sq_norms.sqrt() * trait_norm[:, None])

    applied = g
    if before is not None:
        ref_dots = param_dots if reference is g_t else _example_dots(inputs, out_grads, reference)
        applied, before_state = before.update(
            g, before_state, old, reference=reference, example_dots=ref_dots
        )
    for name, p in params.items():
        p.grad = applied[name].detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        delta = {n: p.detach() - old[n] for n, p in params.items()}
        if after is not None:
            negative = {n: -r for n, r in reference.items()}
            delta, after_state = after.update(delta, after_state, old, reference=negative)
            for name, p in params.items():
                p.copy_(old[name] + delta[name])

    with torch.no_grad():
        after_loss = example_cross_entropy(
            stack_forward(params, probes.images)[..., :num_classes], probes.labels
        ).mean(-1)
    layer_dot = model_layer_dot(g, g_t)
    layer_g = model_layer_dot(g, g).sqrt()
    layer_t = trait_layer_sq.sqrt()
    g_dot_t = layer_dot.sum(1)
    g_norm = layer_g.square().sum(1).sqrt()
    predicted = model_dot(g_t, delta)
    level = torch.tensor(list(quantiles), dtype=example_cosine.dtype)
    records = {
        "train_loss": loss.detach(),
        "distill_loss": distill.detach().mean(-1),
        "trait_loss": trait_loss,
        "cosine": safe_divide(g_dot_t, g_norm * trait_norm),
        "trait_norm": trait_norm,
        "train_norm": g_norm,
        "projection": safe_divide(g_dot_t, trait_norm.square()),
        "layer_cosine": safe_divide(layer_dot, layer_g * layer_t),
        "layer_trait_norm": layer_t,
        "layer_train_norm": layer_g,
        "applied_cosine": _cosine(applied, g_t) if before is not None else None,
        "update_cosine": safe_divide(predicted, trait_norm * model_dot(delta, delta).sqrt()),
        "predicted_change": predicted,
        "measured_change": after_loss - trait_loss,
        "example_cosine_mean": example_cosine.mean(-1),
        "example_cosine_quantile": torch.quantile(example_cosine.detach().cpu(), level, dim=-1).T,
        "example_cosine_frac_positive": (example_cosine > 0).to(dots.dtype).mean(-1),
    }
    moment = _moment(optimizer, params)
    records["momentum_cosine"] = (
        _cosine(moment, g_t) if moment else torch.full((models,), float("nan"))
    )
    if heldout and probes.heldout_images is not None and probes.heldout_labels is not None:
        old_params = {n: old[n].requires_grad_(True) for n in names}
        h_loss, g_h = _trait(old_params, probes.heldout_images, probes.heldout_labels, num_classes)
        records["heldout_trait_loss"] = h_loss
        records["heldout_cosine"] = _cosine(g, g_h)
        records["heldout_update_cosine"] = _cosine(delta, g_h)
    if before is None:
        records["applied_cosine"] = records["cosine"]
    records = {k: v.detach().to("cpu", torch.float64) for k, v in records.items()}
    return StackedResult(records, example_cosine.detach().cpu(), before_state, after_state)


def layer_names(params: Mapping[str, Tensor]) -> list[str]:
    """The layer names of a stack, in parameter order."""
    return list(group_by_layer(params))
