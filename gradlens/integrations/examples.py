"""The per-example values of a trainer's micro-batches, and the check that they make up ``.grad``.

:class:`ExampleValues` collects what :func:`~gradlens.probe_batch` found on each
micro-batch of one optimizer step (losses, dots with ``g_t``, squared norms, and the
running sum of the examples' gradients) and, at the optimizer step, checks that the
examples' mean gradient is the gradient the trainer accumulated (cosine and norm,
clip-aware) before turning them into the step's per-example records.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gradlens.alignment.gradops import cosine, norm, safe_divide
from gradlens.alignment.measures import summarize
from gradlens.errors import GradientMismatchError
from gradlens.probes.ghost import Probe

__all__ = ["CONSISTENT", "ExampleValues"]

CONSISTENT = {torch.float64: 1e-4, torch.float32: 1e-4}
"""How close cos(the examples' mean gradient, ``.grad``) must be to 1, and their norms to
each other (relative), by the parameters' dtype. The two are the same sum in another order,
but the trainer's loss may run in float32 for float64 parameters (Hugging Face's losses call
``logits.float()``), so float32's ``eps`` sets the bound for both; a wrong loss (another
normalisation, micro-batch means averaged over micro-batches of unequal size) is off by far
more (a norm 6/5 too large for a language-model loss over the unshifted token count)."""


class ExampleValues:
    """The per-example values of the micro-batches seen since the last optimizer step."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.dots: list[dict[str, Tensor]] = []
        self.sq_norms: list[Tensor] = []
        self.grad_sum: dict[str, Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.losses)

    def add(self, found: Probe) -> None:
        """Add one micro-batch's probe (taken with one ``reference=``, ``g_t``)."""
        count = len(found.losses)
        self.losses.append(found.losses.detach())
        self.dots.append(found.dots)
        self.sq_norms.append(torch.stack(list(found.sq_norms.values())).sum(0))
        for name, g in found.grad.items():
            total = g.detach() * count
            self.grad_sum[name] = self.grad_sum[name] + total if name in self.grad_sum else total

    def check(self, grad: Mapping[str, Tensor], step: int, max_norm: float | None) -> None:
        """Raise unless the examples' mean gradient is ``grad`` (clipped to ``max_norm``).

        Raises:
            GradientMismatchError: Naming the cosine and norms, and the likely causes.
        """
        count = sum(len(x) for x in self.losses)
        mean = {n: self.grad_sum[n] / count for n in grad}
        agree = cosine(mean, grad)
        expected = norm(mean)
        if max_norm is not None:  # clip_grad_norm_'s own formula, eps included
            expected = expected * (max_norm / (expected + 1e-6)).clamp(max=1.0)
        got = norm(grad)
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

    def records(self, trait_norm: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """``(records, example_dots, example_cosine)`` of all the micro-batches' examples.

        Args:
            trait_norm: ``||g_t||``, shape ``()``.

        Returns:
            The per-example records (``train_loss``, ``example_cosine_*``), the
            dots by parameter ``(example,)`` for a per-example transform, and
            ``cos(g_i, g_t)``, shape ``(example,)``.
        """
        dots = torch.cat([torch.stack(list(d.values())).sum(0) for d in self.dots])
        example_cosine = safe_divide(dots, torch.cat(self.sq_norms).sqrt() * trait_norm)
        summary = summarize(example_cosine)
        records = {
            "train_loss": torch.cat(self.losses).mean(),
            "example_cosine_mean": summary["mean"],
            "example_cosine_quantile": summary["quantile"],
            "example_cosine_frac_positive": summary["frac_positive"],
        }
        example_dots = {n: torch.cat([d[n] for d in self.dots]) for n in self.dots[0]}
        return records, example_dots, example_cosine
