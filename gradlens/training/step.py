"""One probed training step of one model.

:func:`probed_step` is the one-model mode of the step body
(:mod:`gradlens.training.body`): it measures the trait gradient ``g_t`` and the training
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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.compiling import Compile, check_compile, compiling, options_of
from gradlens.errors import UnsupportedModelError
from gradlens.probes.batch import forward as call_model
from gradlens.probes.checks import LossFn, check_not_meta
from gradlens.probes.ghost import Method, probe_batch
from gradlens.probes.outputs import OutputSelector, plain_forward, select_output
from gradlens.probes.vmap import Randomness, check_vmap_compatible, loss_and_grad
from gradlens.training.amortise import TraitCache
from gradlens.training.body import StepResult, run_step
from gradlens.training.checks import check_objective, check_optimizer
from gradlens.training.mode import ModeProbe, micro_batches
from gradlens.training.objective import Objective
from gradlens.training.tokens import token_probe
from gradlens.transforms.base import GradientTransform

__all__ = ["SingleMode", "probed_step"]


def trained_params(model: nn.Module) -> dict[str, Tensor]:
    """The parameters of ``model`` that require grad, or a clear error if there are none."""
    check_not_meta(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no parameter that requires grad: probed_step "
            "probes and trains those; call requires_grad_() on the parameters to train."
        )
    return params


def objective_parts(
    forward: nn.Module, objective: Objective, output: OutputSelector | None
) -> dict[str, Tensor]:
    """The objective's named parts on its batch: one forward without grad, RNG streams kept."""
    if not objective.parts:
        return {}
    devices = [t.device for t in objective.targets if t.device.type == "cuda"][:1]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        outputs = select_output(call_model(forward, objective.inputs), output)
        return {
            name: fn(outputs, *objective.targets).detach().reshape(())
            for name, fn in objective.parts.items()
        }


class SingleMode:
    """One model in one process: :func:`probed_step`'s mode of the step body."""

    def __init__(
        self,
        model: nn.Module,
        *,
        method: Method = "auto",
        chunk_size: int | None = None,
        randomness: Randomness = "error",
        output: OutputSelector | None = None,
    ) -> None:
        self.model = model
        self.method: Method = method
        self.chunk_size = chunk_size
        self.randomness: Randomness = randomness
        self.output = output
        self.params = trained_params(model)

    def over_models(self, fn: Any) -> Any:
        """One model: ``fn`` itself."""
        return fn

    def gradient(self, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective's loss and gradient, from one plain backward."""
        return loss_and_grad(
            self.model, objective.loss_fn, objective.inputs, *objective.targets, output=self.output
        )

    def probe(self, train: Objective, references: list[Mapping[str, Tensor]]) -> ModeProbe:
        """One pass of :func:`~gradlens.probe_batch` with every reference."""
        refs = {str(k): r for k, r in enumerate(references)}
        found = probe_batch(
            self.model,
            train.loss_fn,
            train.inputs,
            *train.targets,
            reference=references[0] if len(references) == 1 else None,
            references=refs if len(references) > 1 else None,
            method=self.method,
            chunk_size=self.chunk_size,
            randomness=self.randomness,
            output=self.output,
        )
        if len(references) == 1:
            dots = [found.dots]
        else:
            dots = [{n: d[..., k] for n, d in found.dots.items()} for k in range(len(references))]
        parts = objective_parts(self.model, train, self.output)
        return ModeProbe(found.losses.mean(), found.grad, dots, found.sq_norms, parts, found.plan)

    def after_step(self, trait: Objective | None, step: int | None) -> Tensor | None:
        """The trait loss at the new parameters."""
        del step
        if trait is None:
            return None
        with torch.no_grad():
            out = select_output(call_model(self.model, trait.inputs), self.output)
            return trait.loss_fn(out, *trait.targets)


def probed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Objective | Sequence[Objective],
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
    heldout: Objective | None = None,
    reference: Objective | None = None,
    momentum: bool = False,
    token_loss: LossFn | None = None,
    trait_cache: TraitCache | None = None,
    part_gradients: bool = False,
    compile: bool | Compile = False,
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

    Args:
        model: The student.
        optimizer: A ``torch.optim`` optimizer over ``model``'s parameters.
        train: The training objective (for a student, the distillation loss
            plus any extra term; name its pieces in ``train.parts`` to record them),
            or a sequence of micro-batches: gradient accumulation, one optimizer
            step along the mean gradient of all their examples, per-example values
            concatenated in order (equal to one step on the concatenated batch).
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
        heldout: A held-out trait objective (other labelled examples): records
            ``heldout_trait_loss``, ``heldout_cosine`` and
            ``heldout_update_cosine`` (one more backward).
        reference: The transforms act along this objective's gradient instead
            of ``g_t`` (a control, e.g. shuffled trait labels); one more backward.
        momentum: Record ``momentum_cosine``, cos(g_t, the optimizer's first
            moment after the step); NaN for an optimizer without one.
        token_loss: Record ``token_dot`` ``(example, token)``, each training
            token's loss term against ``g_t`` (:func:`~gradlens.probes.token_dots`,
            one forward-mode pass per micro-batch): ``token_loss(outputs, *targets)
            -> (example, token)`` splits ``train.loss_fn`` into per-token terms
            (``training.losses.token_losses`` for ``token_mean``), checked to sum to it.
        trait_cache: Take the trait gradient every few steps and reuse it in
            between: :func:`~gradlens.training.reuse_trait` on the first step, then
            the last result's ``trait_cache``; records ``trait_age``, and
            ``measured_change`` is NaN on the steps that reuse ``g_t``.
        part_gradients: Also record ``train_part_cosine`` and ``train_part_norm``
            (dim ``part``): ``g_t`` against the gradient of each of ``train.parts``,
            one backward each (a single ``train`` objective, not micro-batches),
            e.g. the distillation loss and an added KL term taken apart.
        compile: Run gradlens's own tensor arithmetic of the step (the factored
            forms' products, the ``vmap`` path's reductions, the records) through
            ``torch.compile``: ``True`` for inductor, or a
            :class:`~gradlens.compiling.Compile` (another backend, or
            ``cuda_graphs=True`` on a GPU). The model itself runs eagerly; the
            results are the eager step's (:mod:`gradlens.compiling`).

    Returns:
        A :class:`~gradlens.training.StepResult`.

    Raises:
        NonFiniteGradientError: If ``g_t`` or ``g`` has NaN or infinite values.
        ValueError: If a batch is empty or its targets do not match its inputs,
            the optimizer does not hold the model's parameters, or
            ``train.loss_fn`` is not the mean of the examples' losses (checked on
            the whole batch, from the probe's own outputs, before the optimizer steps).
        CompileError: If ``compile``'s backend cannot compile (inductor without
            a C++ compiler); the message names the backend that needs none.
        UnsupportedModelError: If no parameter requires grad, or the model
            cannot be probed per example (train-mode BatchNorm, for one; the
            message names the argument to change); raised before any forward,
            so buffers such as BatchNorm's running statistics are unchanged.
    """
    mode = SingleMode(
        model, method=method, chunk_size=chunk_size, randomness=randomness, output=output
    )
    # Everything that can be refused is refused before any forward changes a buffer.
    batches = micro_batches(train)
    named = [(f"train[{i}]" if len(batches) > 1 else "train", b) for i, b in enumerate(batches)]
    for which, objective in (
        *named,
        ("trait", trait),
        ("heldout", heldout),
        ("reference", reference),
    ):
        if objective is not None:
            check_objective(which, objective)
    check_optimizer(optimizer, mode.params)
    check_vmap_compatible(model, randomness)
    options = options_of(compile)
    check_compile(options, (p.device for p in mode.params.values()))
    # Whether train.loss_fn is the mean of the examples' losses is checked on the whole
    # batch by the probe, on its own outputs (no forward of its own), before any step.
    with plain_forward(model), compiling(options):
        return run_step(
            mode,
            optimizer,
            train,
            trait,
            before=before,
            before_state=before_state,
            after=after,
            after_state=after_state,
            step=step,
            measure_change=measure_change,
            heldout=heldout,
            reference=reference,
            momentum=momentum,
            trait_cache=trait_cache,
            part_gradients=part_gradients,
            tokens=None
            if token_loss is None
            else token_probe(model, token_loss, batches, chunk_size=chunk_size, output=output),
        )
