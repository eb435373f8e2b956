"""One probed step of every model of a :class:`~gradlens.training.Stack` at once.

:func:`stacked_probed_step` is the many-models mode of the step body
(:mod:`gradlens.training.body`): the same sequence, checks and records as
:func:`~gradlens.training.probed_step`, each record with a leading ``model``
dim, for ``M`` independent models trained in one process, each with its own
optimizer state (an elementwise optimizer over the stacked tensors) and its
own transform state (transforms wrapped in
:func:`~gradlens.transforms.per_model`).

The per-example dots and squared norms come from one of two exact paths:

- ``"matmul"`` (an MLP: ``nn.Sequential`` of ``nn.Linear`` and
  parameter-free elementwise modules): one batched matmul per layer and the
  factored form of each linear layer, ``<b_i a_i^T, R> = b_i^T R a_i`` and
  ``||b_i a_i^T||^2 = ||b_i||^2 ||a_i||^2``, with ``a_i`` the layer's input
  and ``b_i`` the gradient of example ``i``'s loss with respect to its output;
- ``"vmap"`` (any architecture): per-example gradients by ``vmap`` over the
  models of ``vmap`` over the examples, reduced to dots and norms chunk by
  chunk (``chunk_size`` examples at a time).

``method="auto"`` takes the matmul path where it applies.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> from gradlens.training import Objective, stack_modules
    >>> from gradlens.transforms import per_model, remove_aligned
    >>> stack = stack_modules([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    ...                        for _ in range(3)])
    >>> opt = torch.optim.Adam(stack.params.values(), lr=1e-3)
    >>> x = torch.randn(16, 4)  # one trait batch that every model shares
    >>> trait = Objective(F.cross_entropy, x.expand(3, 16, 4), (torch.randint(0, 3, (3, 16)),))
    >>> train = Objective(F.mse_loss, torch.randn(3, 8, 4), (torch.randn(3, 8, 3),))
    >>> tx = per_model(remove_aligned())
    >>> out = stacked_probed_step(stack, opt, train, trait, before=tx,
    ...                           before_state=tx.init(stack.params))
    >>> out.records["cosine"].shape, out.example_cosine.shape
    (torch.Size([3]), torch.Size([3, 8]))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value

from gradlens.errors import UnsupportedModelError
from gradlens.probes.checks import (
    DeferredCheck,
    check_chunk_size,
    check_mean_loss,
    check_vmap_compatible,
    mean_loss_rtol,
    settle,
)
from gradlens.probes.outputs import OutputSelector, select_output
from gradlens.probes.plan import PlanEntry
from gradlens.training.amortise import TraitCache
from gradlens.training.body import StepResult, run_step
from gradlens.training.checks import check_optimizer
from gradlens.training.mode import ModeProbe, micro_batches
from gradlens.training.objective import Objective
from gradlens.training.stack import Stack, mlp_layers, mlp_pass, stack_forward
from gradlens.transforms.base import GradientTransform
from gradlens.transforms.per_model import is_per_model

__all__ = ["StackedMethod", "StackedMode", "stacked_probed_step"]

StackedMethod = Literal["auto", "matmul", "vmap"]
"""How a stacked step gets its per-example dots: see the module docstring."""

Grads = Mapping[str, Tensor]


def _model_losses(loss_fn: Callable[..., Tensor], outputs: Tensor, targets: tuple) -> Tensor:
    """Each model's batch loss, ``(model,)``: ``loss_fn`` written for one model's batch.

    A loop, not ``vmap``: several of torch's losses (``kl_div``) have no
    batching rule, and vmap would loop over the models all the same.
    """
    losses = [loss_fn(outputs[m], *(t[m] for t in targets)) for m in range(outputs.shape[0])]
    if any(not isinstance(v, Tensor) or v.ndim != 0 for v in losses):
        raise ValueError(
            "loss_fn must return a scalar for one model's batch, the mean loss of its examples: "
            "keep reduction='mean' (the default of torch's losses) or end it with .mean()."
        )
    return torch.stack(losses)


def _example_losses(loss_fn: Callable[..., Tensor], outputs: Tensor, targets: tuple) -> Tensor:
    """Each model's each example's loss, ``(model, example)``, from computed outputs."""

    def one(o: Tensor, *t: Tensor) -> Tensor:
        return loss_fn(o.unsqueeze(0), *(v.unsqueeze(0) for v in t))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        return torch.func.vmap(torch.func.vmap(one))(outputs, *targets)


def _check_model_means(loss: Tensor, each: Tensor) -> None:
    """:func:`~gradlens.probes.checks.check_mean_loss` for every model, with one host sync.

    Its flag is settled (:func:`~gradlens.probes.checks.settle`): read now, or
    held inside :func:`~gradlens.probes.deferred.deferred_checks`.

    Args:
        loss: Each model's batch loss, ``(model,)``.
        each: Each example's loss alone, ``(model, example)``.
    """
    if each.shape[1] < 2:
        return
    mean = each.mean(-1)
    rtol = mean_loss_rtol(each.dtype)
    # not (close): a NaN mean beside a finite loss is off too (check_mean_loss names it)
    off = ~((loss - mean).abs() <= rtol * torch.maximum(loss.abs(), mean.abs()) + 1e-7)

    def explain() -> None:
        first = int(off.nonzero()[0, 0])
        check_mean_loss(loss[first], each[first])

    settle([DeferredCheck(off.any(), explain)])


class StackedMode:
    """The models of a :class:`Stack` in one process: :func:`stacked_probed_step`'s mode."""

    def __init__(
        self,
        stack: Stack,
        *,
        method: StackedMethod = "auto",
        chunk_size: int | None = None,
        output: OutputSelector | None = None,
    ) -> None:
        if method not in ("auto", "matmul", "vmap"):
            raise ValueError(f"method must be 'auto', 'matmul' or 'vmap', not {method!r}.")
        check_chunk_size(chunk_size)
        self.stack = stack
        self.params = stack.params
        self.output = output
        self.chunk_size = chunk_size
        self.layers = mlp_layers(stack.module) if method != "vmap" else None
        if method == "matmul" and self.layers is None:
            raise UnsupportedModelError(
                f"method='matmul' needs an MLP (nn.Sequential of nn.Linear and parameter-free "
                f"elementwise modules); {type(stack.module).__name__} is not one. Use "
                "method='auto' or 'vmap'."
            )

    def over_models(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` of one model, ``vmap`` over the ``model`` dim."""
        return torch.func.vmap(fn)

    def forward(self, inputs: Tensor) -> Tensor:
        """Every model's output, ``(model, example, ...)``."""
        return stack_forward(self.stack, inputs, output=self.output)

    def gradient(self, objective: Objective) -> tuple[Tensor, dict[str, Tensor]]:
        """Each model's loss ``(model,)`` and gradient, from one backward of their sum."""
        with torch.enable_grad():
            loss = _model_losses(
                objective.loss_fn, self.forward(objective.inputs), objective.targets
            )
            grads = torch.autograd.grad(loss.sum(), list(self.params.values()))
        return loss.detach(), dict(zip(self.params, grads, strict=True))

    def probe(self, train: Objective, references: list[Grads]) -> ModeProbe:
        """The batch loss and gradient of every model and the per-example dots and norms."""
        if self.layers is not None and train.inputs.ndim == 3:
            return self._matmul_probe(train, references)
        return self._vmap_probe(train, references)

    def _parts(self, train: Objective, outputs: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return {
                name: _model_losses(fn, outputs, train.targets) for name, fn in train.parts.items()
            }

    def _matmul_probe(self, train: Objective, references: list[Grads]) -> ModeProbe:
        assert self.layers is not None
        names = list(self.params)
        with torch.enable_grad():
            found = mlp_pass(self.layers, self.params, train.inputs)
            loss = _model_losses(train.loss_fn, found.outputs, train.targets)
            outs = list(found.layer_outputs.values())
            grads = torch.autograd.grad(loss.sum(), [*self.params.values(), *outs])
        each = _example_losses(train.loss_fn, found.outputs.detach(), train.targets)
        _check_model_means(loss.detach(), each)
        g = dict(zip(names, grads[: len(names)], strict=True))
        size = train.inputs.shape[1]
        # The batch loss is the mean over examples: example i's own output gradient is size x.
        b = {
            layer: d.detach() * size
            for layer, d in zip(found.layer_outputs, grads[len(names) :], strict=True)
        }
        a = {layer: h.detach() for layer, h in found.layer_inputs.items()}
        dots = []
        for ref in references:
            d = {}
            for layer in a:
                d[f"{layer}.weight"] = torch.einsum(
                    "mbo,moi,mbi->mb", b[layer], ref[f"{layer}.weight"], a[layer]
                )
                if f"{layer}.bias" in ref:
                    d[f"{layer}.bias"] = torch.einsum("mbo,mo->mb", b[layer], ref[f"{layer}.bias"])
            dots.append({n: d[n] for n in names})
        sq = {}
        for layer in a:
            b2 = b[layer].square().sum(-1)
            sq[f"{layer}.weight"] = b2 * a[layer].square().sum(-1)
            if f"{layer}.bias" in self.params:
                sq[f"{layer}.bias"] = b2
        sq = {n: sq[n] for n in names}
        plan = {
            n: PlanEntry(
                "ghost",
                "stacked MLP: the factored F.linear form on batched matmuls",
                example_axis=1,
                form="F.linear",
            )
            for n in names
        }
        parts = self._parts(train, found.outputs.detach())
        return ModeProbe(loss.detach(), g, dots, sq, parts, plan)

    def _vmap_probe(self, train: Objective, references: list[Grads]) -> ModeProbe:
        module, loss_fn, output = self.stack.module, train.loss_fn, self.output

        def example_loss(p: dict, buffers: dict, x: Tensor, *t: Tensor) -> Tensor:
            out = functional_call(module, (p, buffers), (x.unsqueeze(0),))
            return loss_fn(select_output(out, output), *(v.unsqueeze(0) for v in t))

        def one_model(p: dict, buffers: dict, refs: list, x: Tensor, *t: Tensor) -> tuple:
            def one_example(x_i: Tensor, *t_i: Tensor) -> tuple:
                g_i, loss_i = grad_and_value(example_loss)(p, buffers, x_i, *t_i)
                dots = [{n: (g_i[n] * r[n]).sum() for n in g_i} for r in refs]
                return loss_i, dots, {n: v.square().sum() for n, v in g_i.items()}

            return torch.func.vmap(one_example, chunk_size=self.chunk_size)(x, *t)

        detached = {n: p.detach() for n, p in self.params.items()}
        with warnings.catch_warnings():
            # Ops without a batching rule (kl_div) run as a loop: slower, and as exact.
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            losses, dots, sq = torch.func.vmap(one_model)(
                detached, self.stack.buffers, references, train.inputs, *train.targets
            )
        loss, g = self.gradient(train)
        _check_model_means(loss, losses.detach())
        with torch.no_grad():
            parts = self._parts(train, self.forward(train.inputs)) if train.parts else {}
        plan = {n: PlanEntry("vmap", "stacked: per-example gradients by nested vmap") for n in g}
        return ModeProbe(loss, g, list(dots), sq, parts, plan)

    def after_step(self, trait: Objective | None, step: int | None) -> Tensor | None:
        """Every model's trait loss at the new parameters."""
        del step
        if trait is None:
            return None
        with torch.no_grad():
            return _model_losses(trait.loss_fn, self.forward(trait.inputs), trait.targets)


def _check_stacked(which: str, objective: Objective, models: int) -> None:
    """Raise unless every tensor has the stack's ``model`` dim and then one ``example`` dim."""
    x = objective.inputs
    if x.ndim < 2 or x.shape[0] != models or x.shape[1] == 0:
        raise ValueError(
            f"{which}.inputs has shape {tuple(x.shape)}; a stacked step needs (model, example, "
            f"...) with model = {models} and at least one example (x.expand({models}, *x.shape) "
            "for a batch the models share)."
        )
    for i, t in enumerate(objective.targets):
        if t.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"{which}.targets[{i}] has shape {tuple(t.shape)}; it must start with the "
                f"inputs' (model, example) = {tuple(x.shape[:2])}."
            )


def _check_transform(which: str, transform: GradientTransform | None) -> None:
    if transform is not None and not is_per_model(transform):
        raise TypeError(
            f"{which} is a transform of one model's gradient; a stacked step transforms each "
            f"model alone: pass per_model({which}) (gradlens.transforms.per_model) and its "
            "state from per_model(...).init(stack.params)."
        )


def stacked_probed_step(
    stack: Stack,
    optimizer: torch.optim.Optimizer,
    train: Objective | Sequence[Objective],
    trait: Objective,
    *,
    before: GradientTransform | None = None,
    before_state: Any = None,
    after: GradientTransform | None = None,
    after_state: Any = None,
    step: int | None = None,
    method: StackedMethod = "auto",
    chunk_size: int | None = None,
    output: OutputSelector | None = None,
    measure_change: bool = True,
    heldout: Objective | None = None,
    reference: Objective | None = None,
    momentum: bool = False,
    trait_cache: TraitCache | None = None,
    part_gradients: bool = False,
) -> StepResult:
    """Take one optimizer step of every model of ``stack``, probing each as :func:`probed_step`.

    Model ``m``'s records, per-example cosines, transform state and new
    parameters are those :func:`~gradlens.training.probed_step` gives model
    ``m`` trained alone on ``train``'s and ``trait``'s ``m``-th batches (tested
    in float64). Every objective's tensors have a leading ``model`` dim; each
    ``loss_fn`` is written for one model's batch (it is vmapped over models).

    Args:
        stack: The models; ``optimizer`` holds ``stack.params``.
        optimizer: An elementwise ``torch.optim`` optimizer (Adam, SGD) over
            ``stack.params``: it updates each model as if alone.
        train: The training objective, ``(model, example, ...)``, or its
            micro-batches (gradient accumulation, as in :func:`probed_step`).
        trait: The trait objective, ``(model, example, ...)``.
        before: A :func:`~gradlens.transforms.per_model` transform of ``g``.
        before_state: Its state, from ``before.init(stack.params)`` or the last step.
        after: A :func:`~gradlens.transforms.per_model` transform of the update.
        after_state: Its state.
        step: The step number, for error messages.
        method: ``"auto"``, ``"matmul"`` (MLPs) or ``"vmap"``; see the module docstring.
        chunk_size: Examples per chunk on the vmap path.
        output: Which tensor of the model's return value the losses see.
        measure_change: Also evaluate the trait losses after the step.
        heldout: A held-out trait objective; see :func:`~gradlens.training.probed_step`.
        reference: The transforms act along this objective's gradient instead of ``g_t``.
        momentum: Record ``momentum_cosine``.
        trait_cache: Take the trait gradient every few steps and reuse it in
            between: :func:`~gradlens.training.reuse_trait` on the first step, then
            the last result's ``trait_cache``; records ``trait_age``, and
            ``measured_change`` is NaN on the steps that reuse ``g_t``.
        part_gradients: Also record ``train_part_cosine`` and ``train_part_norm``
            (dim ``part``): ``g_t`` against the gradient of each of ``train.parts``,
            one backward each (a single ``train`` objective, not micro-batches),
            e.g. the distillation loss and an added KL term taken apart.

    Returns:
        A :class:`~gradlens.training.StepResult` whose records have a leading
        ``model`` dim and ``example_cosine`` shape ``(model, example)``.

    Raises:
        ValueError: For objectives without the stack's model dim or without
            examples, an optimizer that does not hold ``stack.params``, or a
            loss that is not mean-reduced (checked on model 0).
        TypeError: For a transform not wrapped in ``per_model``.
        UnsupportedModelError: For a module that cannot be probed per example
            (train-mode BatchNorm, dropout).
        NonFiniteGradientError: If a gradient has NaN or infinite values.
    """
    mode = StackedMode(stack, method=method, chunk_size=chunk_size, output=output)
    models = stack.models
    batches = micro_batches(train)
    for which, objective in (
        *(("train", b) for b in batches),
        ("trait", trait),
        ("heldout", heldout),
        ("reference", reference),
    ):
        if objective is not None:
            _check_stacked(which, objective, models)
    _check_transform("before", before)
    _check_transform("after", after)
    check_optimizer(optimizer, stack.params)
    check_vmap_compatible(stack.module, "error")
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
    )
