"""Arithmetic on gradient dicts.

A gradient is a ``dict[str, Tensor]`` keyed by ``named_parameters()`` names. A
per-example gradient carries a leading ``example`` axis on every value. The
functions here treat a dict as one flat vector, so ``dot(a, b)`` is the inner
product of the concatenated, flattened values.

Every binary operation first checks that both dicts have the same keys and
shapes and raises :class:`~gradlens.errors.GradientMismatchError` naming the
difference otherwise.

Example:
    >>> import torch
    >>> a = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    >>> float(norm(a))
    5.0
    >>> float(cosine(a, scale(a, -2.0)))
    -1.0
    >>> float(cosine(a, zeros_like(a)))
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from gradlens.errors import GradientMismatchError, NonFiniteGradientError

__all__ = [
    "Grads",
    "add",
    "check_compatible",
    "check_finite",
    "cosine",
    "dot",
    "flatten",
    "group_by_layer",
    "layer_of",
    "norm",
    "projection_coef",
    "scale",
    "sq_norm",
    "sub",
    "tree_map",
    "zeros_like",
]

Grads = Mapping[str, Tensor]


def check_compatible(a: Grads, b: Grads, *, what: str = "gradients") -> None:
    """Raise unless ``a`` and ``b`` have the same keys and the same shapes.

    Args:
        a: A gradient dict.
        b: Another gradient dict.
        what: How the error message names the pair.

    Raises:
        GradientMismatchError: Naming the missing keys or the first shape mismatch.
    """
    if a.keys() != b.keys():
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        raise GradientMismatchError(
            f"{what} have different keys: only in the first {only_a}, only in the second "
            f"{only_b}. Compute both over the same parameters (the `params` argument)."
        )
    for name in a:
        if a[name].shape != b[name].shape:
            raise GradientMismatchError(
                f"{what} differ in shape at {name!r}: {tuple(a[name].shape)} against "
                f"{tuple(b[name].shape)}."
            )


def tree_map(fn: Callable[..., Tensor], first: Grads, *rest: Grads) -> dict[str, Tensor]:
    """Apply ``fn`` key by key over one or more compatible gradient dicts."""
    for other in rest:
        check_compatible(first, other)
    return {name: fn(first[name], *(other[name] for other in rest)) for name in first}


def add(a: Grads, b: Grads) -> dict[str, Tensor]:
    """Return ``a + b``."""
    return tree_map(torch.add, a, b)


def sub(a: Grads, b: Grads) -> dict[str, Tensor]:
    """Return ``a - b``."""
    return tree_map(torch.sub, a, b)


def scale(a: Grads, alpha: float | Tensor) -> dict[str, Tensor]:
    """Return ``alpha * a``; ``alpha`` may be a 0-d tensor."""
    return {name: alpha * value for name, value in a.items()}


def zeros_like(a: Grads) -> dict[str, Tensor]:
    """Return a dict of zeros shaped like ``a``."""
    return {name: torch.zeros_like(value) for name, value in a.items()}


def dot(a: Grads, b: Grads) -> Tensor:
    """Return the inner product of two gradient dicts, a 0-d tensor."""
    check_compatible(a, b)
    return torch.stack([torch.vdot(a[n].reshape(-1), b[n].reshape(-1)) for n in a]).sum()


def sq_norm(a: Grads) -> Tensor:
    """Return the squared Euclidean norm of a gradient dict, a 0-d tensor."""
    return torch.stack(torch._foreach_norm(list(a.values()))).square().sum()


def norm(a: Grads) -> Tensor:
    """Return the Euclidean norm of a gradient dict, a 0-d tensor."""
    return sq_norm(a).sqrt()


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """Return ``num / den`` where ``den != 0`` and 0 elsewhere, with no NaN or warning."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


def cosine(a: Grads, b: Grads) -> Tensor:
    """Return the cosine between two gradient dicts; 0.0 if either has zero norm."""
    return safe_divide(dot(a, b), norm(a) * norm(b))


def projection_coef(g: Grads, *, reference: Grads) -> Tensor:
    """Return ``<g, r> / ||r||^2``, the coefficient of ``g``'s component along ``r``.

    ``g - projection_coef(g, reference=r) * r`` is orthogonal to ``r``. The
    coefficient is 0.0 when ``r`` is zero.
    """
    return safe_divide(dot(g, reference), sq_norm(reference))


def flatten(a: Grads, *, batch: bool = False) -> Tensor:
    """Concatenate a gradient dict into one vector, in key order.

    Args:
        a: Gradient dict; with ``batch``, every value has a leading ``example`` axis.
        batch: Keep the leading ``example`` axis.

    Returns:
        Shape ``(parameter,)``, or ``(example, parameter)`` with ``batch``.
    """
    if batch:
        return torch.cat([value.flatten(start_dim=1) for value in a.values()], dim=1)
    return torch.cat([value.reshape(-1) for value in a.values()])


def layer_of(name: str) -> str:
    """Return the module prefix of a parameter name: ``"net.0.weight"`` -> ``"net.0"``."""
    return name.rpartition(".")[0] or name


def group_by_layer(names: Iterable[str]) -> dict[str, list[str]]:
    """Group parameter names by their module, in first-seen order.

    Example:
        >>> group_by_layer(["0.weight", "0.bias", "2.weight"])
        {'0': ['0.weight', '0.bias'], '2': ['2.weight']}
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name), []).append(name)
    return groups


def check_finite(a: Grads, *, step: int | None = None, what: str = "gradient") -> None:
    """Raise if any value of a gradient dict is NaN or infinite.

    Args:
        a: A gradient dict.
        step: The training step, for the message.
        what: How the message names the gradient.

    Raises:
        NonFiniteGradientError: Naming the step and the parameters affected.
    """
    # One fused max-abs per tensor and one host sync: a probed step is launch-bound on a GPU.
    filled = [value for value in a.values() if value.numel() > 0]
    if not filled or bool(torch.stack(torch._foreach_norm(filled, ord=math.inf)).isfinite().all()):
        return
    bad = tuple(name for name, value in a.items() if not bool(torch.isfinite(value).all()))
    if bad:
        raise non_finite_error(what, step, bad)


def non_finite_error(what: str, step: int | None, bad: tuple[str, ...]) -> NonFiniteGradientError:
    """The error for a gradient ``what`` whose parameters ``bad`` have NaN or infinite values."""
    at = f" at step {step}" if step is not None else ""
    return NonFiniteGradientError(
        f"the {what}{at} has NaN or infinite values in {list(bad)}. Lower the learning "
        "rate, check the loss for log(0) or division by zero, or check the inputs.",
        step=step,
        names=bad,
    )
