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

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradlens._outputs import OutputSelector, no_kv_cache, select_output
from gradlens.alignment import alignment_of_finite, example_alignment, summarize
from gradlens.errors import GradientMismatchError, UnsupportedModelError
from gradlens.ghost import Method, probe_batch
from gradlens.gradops import check_finite, dot, norm, safe_divide, scale
from gradlens.per_example import (
    LossFn,
    Randomness,
    check_batch,
    check_vmap_compatible,
    loss_and_grad,
)
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
        ValueError: If a batch is empty or its targets do not match its inputs,
            the optimizer does not hold the model's parameters, or
            ``train.loss_fn`` is not mean-reduced (checked on two examples).
        UnsupportedModelError: If no parameter requires grad, or the model
            cannot be probed per example (train-mode BatchNorm, for one; the
            message names the argument to change); raised before any forward,
            so buffers such as BatchNorm's running statistics are unchanged.
    """
    params = _params(model)
    if not params:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no parameter that requires grad: probed_step "
            "probes and trains those; call requires_grad_() on the parameters to train."
        )
    # Everything that can be refused is refused before any forward changes a buffer.
    _check_objective("train", train)
    _check_objective("trait", trait)
    _check_optimizer(optimizer, params)
    check_vmap_compatible(model, randomness)
    with no_kv_cache(model):
        _check_mean_reduction(model, train, output)
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
    align = alignment_of_finite(probe.grad, reference=g_t)
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


def _check_objective(which: str, objective: Objective) -> None:
    """Raise for an objective without examples or with targets of other examples."""
    check_batch(objective.inputs, objective.targets, what=f"{which}.inputs")
    if objective.inputs.shape[0] == 0:
        raise ValueError(
            f"{which}.inputs has no examples (shape {tuple(objective.inputs.shape)}); a probed "
            f"step needs at least one in each batch. Skip empty batches (for a DataLoader, "
            "drop_last=True)."
        )


def _check_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, Tensor]) -> None:
    """Raise if ``optimizer`` would not update some of ``params`` (a step would be a no-op)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in held]
    if missing:
        shown = missing if len(missing) <= 4 else [*missing[:4], f"... {len(missing) - 4} more"]
        raise ValueError(
            f"the optimizer does not hold the model's parameters {shown}, so its step would "
            "leave them unchanged. Build it from this model's parameters, "
            "torch.optim.SGD(model.parameters(), ...), after any copy.deepcopy or .to(...) "
            "that replaces them; freeze parameters you do not train (requires_grad_(False))."
        )


def _check_mean_reduction(
    model: nn.Module, objective: Objective, output: OutputSelector | None
) -> None:
    """Raise unless the loss of two examples is the mean of their losses alone.

    :func:`probed_step` steps along the mean of the per-example gradients,
    which is the gradient of the batch loss only when that loss is the mean
    of the per-example losses; for ``reduction='sum'`` it would be a step
    ``example`` times smaller than a plain backward. One forward of two
    examples, one host sync, and the random number streams left as they were
    (a dropout draw here must not change the step's masks).
    """
    if objective.inputs.shape[0] < 2:
        return
    loss_fn = objective.loss_fn
    device = objective.inputs.device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        outputs = select_output(model(objective.inputs[:2]), output)
        targets = [t[:2] for t in objective.targets]
        batch = loss_fn(outputs, *targets)
        if not isinstance(batch, Tensor) or batch.numel() != 1:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(
                f"train.loss_fn returned {shape} for a batch of 2; it must return a scalar, the "
                "mean loss of the batch: keep reduction='mean' (the default of torch's losses) "
                "or end it with .mean()."
            )
        each = [loss_fn(outputs[i : i + 1], *(t[i : i + 1] for t in targets)) for i in (0, 1)]
        found = torch.stack([batch.reshape(()), *(e.reshape(()) for e in each)]).tolist()
    value, each = found[0], found[1:]
    mean = (each[0] + each[1]) / 2
    if not all(map(math.isfinite, (value, *each))):
        return  # the non-finite gradient it gives is reported by check_finite
    tol = 1e-3 * max(abs(value), abs(mean)) + 1e-6
    if abs(value - mean) <= tol:
        return
    looks = (
        " It is their sum: reduction='sum'?"
        if abs(value - 2 * mean) <= 1e-3 * abs(value) + 1e-6
        else ""
    )
    raise ValueError(
        f"train.loss_fn gives {value:.6g} for two examples whose losses alone are {each[0]:.6g} "
        f"and {each[1]:.6g} (mean {mean:.6g}).{looks} probed_step steps along the mean of the "
        "per-example gradients, which is the batch gradient only for a loss that is the mean "
        "of the examples' losses: use reduction='mean' (the default of torch's losses), or "
        "divide a summed loss by the number of examples."
    )
