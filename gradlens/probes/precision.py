"""Reduced precision: float32 accumulation on every path, and the cosines' noise floor.

Under ``torch.autocast`` (bfloat16, float16) or on bfloat16/float16 parameters,
the forward and backward run in the reduced dtype, but every per-example dot
and squared norm is accumulated and returned in
:func:`~gradlens.numerics.accumulation_dtype` (float32; float64 stays float64):
the references are held in it, per-example gradients and the ghost path's
captured inputs and output gradients are upcast to it before the reductions,
and those reductions run with autocast off.

The rounding of the forward and backward remains: a cosine computed in
bfloat16 differs from the float64 one by up to :data:`NOISE_FLOOR` (the 95th
percentile of ``|cos_reduced - cos_float64|`` of batch cosines, measured by
``docs/results/precision_floor/noise.py``; numbers in docs/models.md). A probe
that runs in reduced precision and finds a batch cosine below that floor issues
a :class:`~gradlens.errors.PrecisionWarning`.

Example:
    >>> import torch
    >>> weight = torch.ones(3, dtype=torch.bfloat16)
    >>> reduced_dtype({"w": weight})
    torch.bfloat16
    >>> reduced_dtype({"w": weight.float()}) is None
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradlens.errors import PrecisionWarning
from gradlens.numerics import accumulation_dtype
from gradlens.probes.forms.base import Call

__all__ = ["NOISE_FLOOR", "batch_cosines", "reduced_dtype", "upcast_call", "warn_within_noise"]

REDUCED = (torch.bfloat16, torch.float16)

NOISE_FLOOR: dict[torch.dtype, float] = {torch.bfloat16: 6.1e-3, torch.float16: 7.0e-4}
"""95th percentile of ``|cos_reduced - cos_float64|`` of batch cosines, per reduced dtype.

Measured by ``docs/results/precision_floor/noise.py`` (data in ``noise.json``
beside it) over the zoo models and seeds listed there, under autocast and, for
bfloat16, on bfloat16 weights; the larger of the two settings.
"""


def reduced_dtype(params: Mapping[str, Tensor]) -> torch.dtype | None:
    """The reduced dtype a probe of ``params`` runs in, or ``None`` for full precision.

    Args:
        params: The probed parameters.

    Returns:
        bfloat16 or float16 when a parameter has that dtype, or autocast to it
        is enabled on the parameters' device type; else ``None``.
    """
    for p in params.values():
        if p.dtype in REDUCED:
            return p.dtype
    kinds = {p.device.type for p in params.values()}
    for kind in kinds:
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            if dtype in REDUCED:
                return dtype
    return None


def upcast(x: Tensor, like: torch.dtype) -> Tensor:
    """``x`` in the accumulation dtype of ``like`` when it is floating point, else ``x``."""
    if not x.is_floating_point():
        return x
    return x.to(torch.promote_types(accumulation_dtype(like), x.dtype))


def upcast_call(call: Call, dtype: torch.dtype) -> Call:
    """A captured call with its input and parameters in the accumulation dtype of ``dtype``.

    Args:
        call: As captured by the ghost pass.
        dtype: The dtype to accumulate in (float32 for a bfloat16 model).

    Returns:
        The same call, its floating-point tensors upcast.
    """
    if call.input.dtype == torch.promote_types(accumulation_dtype(dtype), call.input.dtype):
        return call  # already wide enough: nothing to copy
    params = {r: None if p is None else upcast(p, dtype) for r, p in call.params.items()}
    options = {k: _as_called(v, call.input.dtype, dtype) if callable(v) else v
               for k, v in call.options.items()}  # fmt: skip
    return call._replace(input=upcast(call.input, dtype), params=params, options=options)


def _as_called(
    fn: Callable[..., Any], called: torch.dtype, wide: torch.dtype
) -> Callable[..., Any]:
    """``fn`` (a form's helper, the normalisation of a norm) run in the dtype of the call.

    Its tensor arguments go back to ``called`` (the dtype the forward ran the
    call in, that of the buffers it closes over) and its result is upcast.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        back = [
            a.to(called) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args
        ]
        found = fn(*back, **kwargs)
        return upcast(found, wide) if isinstance(found, Tensor) else found

    return run


def batch_cosines(grad: Mapping[str, Tensor], references: Mapping[str, Tensor]) -> Tensor:
    """``cos(grad, reference_k)`` over all parameters, accumulated in float32 or wider.

    Args:
        grad: Name -> the batch gradient, param shape.
        references: Name -> stacked references, ``(reference, *param)``.

    Returns:
        Shape ``(reference,)``; 0 where a norm is zero.
    """
    dots, sq, ref_sq = 0.0, 0.0, 0.0
    for name, g in grad.items():
        refs = references[name]
        flat = upcast(g, refs.dtype).reshape(-1)
        r = upcast(refs, g.dtype).reshape(refs.shape[0], -1)
        dots = dots + r @ flat.to(r.dtype)
        sq = sq + flat.square().sum()
        ref_sq = ref_sq + r.square().sum(dim=1)
    den = (sq * ref_sq).sqrt()  # type: ignore[union-attr]
    return torch.where(den > 0, dots / torch.where(den > 0, den, 1.0), 0.0)  # type: ignore[arg-type]


def warn_within_noise(cosines: Tensor, dtype: torch.dtype | None) -> None:
    """Issue a :class:`PrecisionWarning` if a cosine is within ``dtype``'s noise floor.

    The message is the same for every call with the same dtype, so Python's
    default filter shows it once per process; silence it with
    ``warnings.filterwarnings("ignore", category=PrecisionWarning)``.

    Args:
        cosines: Batch cosines, any shape.
        dtype: The reduced dtype the probe ran in, or ``None`` (nothing to check).
    """
    if dtype is None or cosines.numel() == 0:
        return
    floor = NOISE_FLOOR[dtype]
    if bool((cosines.detach().abs() < floor).any()):
        name = str(dtype).removeprefix("torch.")
        warnings.warn(
            f"a batch cosine of the training gradient with its reference is below {floor:.2g}, "
            f"the measured noise floor of cosines computed in {name} (95th percentile of "
            f"|cos_{name} - cos_float64|): its sign and size are rounding noise. Probe in "
            "float32 (outside torch.autocast, float32 weights) to measure alignments this "
            "small; docs/models.md, 'Mixed precision', has the numbers. Silence with "
            "warnings.filterwarnings('ignore', category=gradlens.errors.PrecisionWarning).",
            PrecisionWarning,
            stacklevel=2,
        )
