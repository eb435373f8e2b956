"""One probed training step.

:func:`probed_step` measures the trait gradient ``g_t`` and the training
gradient ``g`` (for a student, the distillation gradient) at the current
parameters, applies optional gradient transforms before the optimizer (to
``g``) and after it (to the optimizer's update), takes the step, and returns
what it measured. Any extra loss term (for example liminal training's KL to
the base model) is part of the :class:`Objective`, so interventions need no
special cases.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from gradlens.transforms import remove_aligned
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trait = Objective(F.cross_entropy, torch.randn(16, 4), (torch.randint(0, 3, (16,)),))
    >>> train = Objective(F.mse_loss, torch.randn(8, 4), (torch.randn(8, 3),))
    >>> before = remove_aligned()
    >>> out = probed_step(model, opt, train, trait, before=before,
    ...                   before_state=before.init(dict(model.named_parameters())))
    >>> abs(float(out.records["update_cosine"])) < 1e-5  # the step is orthogonal to g_t
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradlens._outputs import OutputSelector, no_kv_cache, select_output
from gradlens.alignment import alignment, example_alignment, summarize
from gradlens.errors import GradientMismatchError, UnsupportedModelError
from gradlens.ghost import Method, probe_batch
from gradlens.gradops import check_finite, dot, norm, safe_divide, scale
from gradlens.per_example import LossFn, Randomness, loss_and_grad
from gradlens.transforms.base import GradientTransform

__all__ = ["Objective", "StepResult", "probed_step", "weighted_sum"]


@dataclass(frozen=True)
class Objective:
    """A loss on a batch: ``loss_fn(model(inputs), *targets)``.

    Attributes:
        loss_fn: ``loss_fn(outputs, *targets) -> scalar``, written for a batch, mean-reduced.
        inputs: Shape ``(example, ...)``.
        targets: Each of shape ``(example, ...)``.
    """

    loss_fn: LossFn
    inputs: Tensor
    targets: tuple[Tensor, ...] = field(default_factory=tuple)


def weighted_sum(main: LossFn, extra: LossFn, weight: float, split: int) -> LossFn:
    """Combine two losses: ``main(out, *t[:split]) + weight * extra(out, *t[split:])``.

    Args:
        main: The main loss, taking the first ``split`` targets.
        extra: The extra term, taking the remaining targets.
        weight: The extra term's weight at this step.
        split: How many targets belong to ``main``.

    Returns:
        The combined loss function.
    """

    def loss(outputs: Tensor, *targets: Tensor) -> Tensor:
        return main(outputs, *targets[:split]) + weight * extra(outputs, *targets[split:])

    return loss


class StepResult(NamedTuple):
    """What :func:`probed_step` measured and the transforms' new states.

    Attributes:
        records: Named values: ``()`` scalars, ``(layer,)`` per-layer values and
            ``(quantile,)`` quantiles of the per-example cosines; their
            definitions (long names, units, dims) are
            :data:`gradlens.training.records.STEP_RECORDS`.
        example_cosine: ``cos(g_i, g_t)`` of each training example, shape ``(example,)``.
        before_state: New state of the ``before`` transform (``None`` without one).
        after_state: New state of the ``after`` transform (``None`` without one).
    """

    records: dict[str, Tensor]
    example_cosine: Tensor
    before_state: Any
    after_state: Any


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def probed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Objective,
    trait: Objective,
    *,
    before: GradientTransform | None = None,
    before_state: Any = None,
    after: GradientTransform | None = None,
    after_state: Any = None,
    step: int | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    output: OutputSelector | None = None,
    measure_change: bool = True,
) -> StepResult:
    """Take one optimizer step on ``train`` while probing its alignment with ``trait``.

    1. ``g_t``: gradient of the trait loss at the current parameters.
    2. ``g``, the training losses and the per-example dots with ``g_t``, from
       one forward and backward (:func:`~gradlens.probe_batch`).
    3. ``before`` transforms ``g`` (reference ``g_t``, extra ``example_dots``);
       the optimizer steps; ``after`` transforms the optimizer's update
       ``delta`` with reference ``-g_t`` (the direction in which a step lowers
       the trait loss, so a positive coefficient again means "teaches the
       trait") and the parameters become ``old + delta``. Per-example
       transforms describe gradients, not updates, and get no
       ``example_dots`` after the optimizer: using one there fails loudly.

    The optimizer must hold the model's parameters; their ``.grad`` is set to
    the (transformed) gradient and cleared after the step.

    A training batch without examples gives empty per-example values, NaN
    for ``train_loss`` and the per-example summaries, and a zero training
    gradient, with which the optimizer still steps (momentum or weight decay
    may still move the parameters).

    Args:
        model: The student.
        optimizer: A ``torch.optim`` optimizer over ``model``'s parameters.
        train: The training objective (for a student, the distillation loss
            plus any extra term).
        trait: The trait objective, for example cross-entropy on labelled probes.
        before: Transform applied to ``g`` before the optimizer; name its
            members with :func:`~gradlens.transforms.named_chain` to name their records.
        before_state: Its state, from ``before.init(params)`` or the last step.
        after: Transform applied to the optimizer's update.
        after_state: Its state.
        step: The step number, for error messages.
        method: ``per_example_dots`` method for the per-example probe.
        chunk_size: Examples per chunk where the probe falls back to ``vmap``.
        randomness: ``vmap`` randomness (``"different"`` for dropout), as in
            :func:`~gradlens.per_example_grads`.
        output: Which tensor of the model's return value both losses see, for a
            model that returns a ``ModelOutput``, dict or tuple (``"logits"``, a
            tuple index, or a callable), as in :func:`~gradlens.per_example_grads`;
            it applies to every forward of the step. ``config.use_cache`` is
            switched off during the step.
        measure_change: Also evaluate the trait loss after the step (one forward).

    Returns:
        A :class:`StepResult`.

    Raises:
        NonFiniteGradientError: If ``g_t`` or ``g`` has NaN or infinite values.
        UnsupportedModelError: If no parameter requires grad, or the model
            cannot be probed per example (the message names the argument to change).
        ValueError: If ``trait`` has no examples, or ``train`` has none and
            ``before`` holds a per-example transform.
    """
    params = _params(model)
    if not params:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no parameter that requires grad: probed_step "
            "probes and trains those; call requires_grad_() on the parameters to train."
        )
    if trait.inputs.shape[0] == 0:
        raise ValueError(
            "trait has no examples: g_t is the mean trait gradient over trait.inputs, so "
            "pass a trait Objective with at least one example."
        )
    with no_kv_cache(model):
        return _step(
            model,
            optimizer,
            train,
            trait,
            params,
            before=before,
            before_state=before_state,
            after=after,
            after_state=after_state,
            step=step,
            method=method,
            chunk_size=chunk_size,
            randomness=randomness,
            output=output,
            measure_change=measure_change,
        )


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Objective,
    trait: Objective,
    params: dict[str, Tensor],
    *,
    before: GradientTransform | None,
    before_state: Any,
    after: GradientTransform | None,
    after_state: Any,
    step: int | None,
    method: Method,
    chunk_size: int | None,
    randomness: Randomness,
    output: OutputSelector | None,
    measure_change: bool,
) -> StepResult:
    """:func:`probed_step` with its checks done and the model's key-value cache off."""
    old = {n: p.detach().clone() for n, p in params.items()}
    trait_loss, g_t = loss_and_grad(
        model, trait.loss_fn, trait.inputs, *trait.targets, output=output
    )
    check_finite(g_t, step=step, what="trait gradient")
    probe = probe_batch(
        model,
        train.loss_fn,
        train.inputs,
        *train.targets,
        reference=g_t,
        method=method,
        chunk_size=chunk_size,
        randomness=randomness,
        output=output,
    )
    check_finite(probe.grad, step=step, what="training gradient")
    align = alignment(probe.grad, reference=g_t)
    per_example = example_alignment(probe.dots, probe.sq_norms, reference=g_t)

    grads = probe.grad
    if before is not None:
        try:
            grads, before_state = before.update(
                grads, before_state, old, reference=g_t, example_dots=probe.dots
            )
        except GradientMismatchError as err:
            if train.inputs.shape[0] > 0:
                raise
            raise ValueError(
                "train has no examples, and a per-example transform in before needs at "
                f"least one: pass a train Objective with examples, or no such transform ({err})"
            ) from err
    for name, p in params.items():
        p.grad = grads[name].detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        delta = {n: p.detach() - old[n] for n, p in params.items()}
        if after is not None:
            # An update descends: its part that teaches the trait points along -g_t.
            delta, after_state = after.update(delta, after_state, old, reference=scale(g_t, -1.0))
            for name, p in params.items():
                p.copy_(old[name] + delta[name])

    predicted = dot(g_t, delta)  # first-order trait-loss change of the applied update
    summary = summarize(per_example.cosine)
    records = {
        "train_loss": probe.losses.mean(),
        "trait_loss": trait_loss,
        "cosine": align.cosine,
        "trait_norm": align.reference_norm,
        "train_norm": align.norm,
        "projection": align.projection,
        "layer_cosine": align.layer_cosine,
        "layer_trait_norm": align.layer_reference_norm,
        "layer_train_norm": align.layer_norm,
        "update_cosine": safe_divide(predicted, align.reference_norm * norm(delta)),
        "predicted_change": predicted,
        "example_cosine_mean": summary["mean"],
        "example_cosine_quantile": summary["quantile"],
        "example_cosine_frac_positive": summary["frac_positive"],
    }
    if measure_change:
        with torch.no_grad():
            after_loss = trait.loss_fn(select_output(model(trait.inputs), output), *trait.targets)
        records["measured_change"] = after_loss - trait_loss
    return StepResult(records, per_example.cosine, before_state, after_state)
