"""The per-example values of a trainer's micro-batches, and the check that they make up ``.grad``.

:class:`ExampleValues` collects the probe of each micro-batch of one optimizer step
(:func:`~gradlens.probe_batch`: losses, dots with ``g_t``, squared norms, the mean
gradient) and, at the optimizer step, accumulates them as the step body does
(:func:`~gradlens.training.mode.accumulate`) and checks that the examples' mean gradient
is the gradient the trainer accumulated (cosine and norm, clip-aware); the body then
makes the step's per-example records of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from gradlens.alignment.gradops import cosine, norm
from gradlens.errors import GradientMismatchError
from gradlens.training.mode import ModeProbe, accumulate

__all__ = ["CONSISTENT", "ExampleValues"]

CONSISTENT = {torch.float64: 1e-4, torch.float32: 1e-4}
"""How close cos(the examples' mean gradient, ``.grad``) must be to 1, and their norms to
each other (relative), by the parameters' dtype. The two are the same sum in another order,
but the trainer's loss may run in float32 for float64 parameters (Hugging Face's losses call
``logits.float()``), so float32's ``eps`` sets the bound for both; a wrong loss (another
normalisation, micro-batch means averaged over micro-batches of unequal size) is off by far
more (a norm 6/5 too large for a language-model loss over the unshifted token count)."""


class ExampleValues:
    """The probes of the micro-batches seen since the last optimizer step."""

    def __init__(self) -> None:
        self.probes: list[ModeProbe] = []

    def __bool__(self) -> bool:
        return bool(self.probes)

    def add(self, probe: ModeProbe) -> None:
        """Add one micro-batch's probe (taken with one reference, ``g_t``)."""
        self.probes.append(probe)

    def probe(self, grad: Mapping[str, Tensor], step: int, max_norm: float | None) -> ModeProbe:
        """The probe of all the micro-batches' examples, with the trainer's ``grad`` as ``g``.

        Raises:
            GradientMismatchError: Unless the examples' mean gradient is ``grad``
                (clipped to ``max_norm``), naming the cosine and norms, and the likely causes.
        """
        found = accumulate(self.probes)
        _check(found.grad, grad, step, max_norm)
        return found._replace(grad=dict(grad))


def _check(
    mean: Mapping[str, Tensor], grad: Mapping[str, Tensor], step: int, max_norm: float | None
) -> None:
    """Raise unless ``mean`` (the examples' mean gradient) is ``grad`` (clipped to ``max_norm``)."""
    agree = cosine(mean, grad)
    expected = norm(mean)
    if max_norm is not None:  # clip_grad_norm_'s own formula, eps included
        expected = expected * (max_norm / (expected + 1e-6)).clamp(max=1.0)
    got = norm(grad)
    if not math.isfinite(float(got)):
        return  # the step's finiteness check names the parameters
    dtype = next(iter(grad.values())).dtype
    tol = CONSISTENT.get(dtype)
    if tol is None or not (
        agree >= 1 - tol and abs(float(got) - float(expected)) <= tol * float(expected)
    ):
        raise GradientMismatchError(
            f"step {step}: the per-example pass does not describe the trainer's gradient "
            f"(cos(mean of the examples' gradients, .grad) = {float(agree):.6g}, "
            f"norms {float(expected):.6g} and {float(got):.6g}, clipped to {max_norm}, "
            f"dtype {dtype}): give the loss_fn the trainer minimises, mean-reduced over "
            "examples, micro-batches of equal size (or a loss normalised over the whole "
            "accumulated batch), and train in float32 or float64 (no mixed precision)."
        )
