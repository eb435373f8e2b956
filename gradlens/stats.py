"""Means and paired differences with Student-t confidence intervals, each saying what it is over.

:func:`mean_ci` averages independent replicates (seeds, models);
:func:`paired_t` compares two conditions measured on the same replicates (the
same model, or the same seed, under both), from the per-replicate differences;
:func:`welch_t` compares two independent groups (other models, other code).
All return an ``xarray.Dataset`` whose attrs name the dim the interval is
over (``over``), its confidence and the method, so a table or a figure built
from it can say so.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats

__all__ = ["mean_ci", "paired_t", "welch_t"]


def _check_confidence(confidence: float, name: str) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"{name} must be in (0, 1), got {confidence}.")


def _interval(
    mean: xr.DataArray, sem: xr.DataArray, df: xr.DataArray, confidence: float
) -> xr.Dataset:
    """``mean`` with its t interval from a standard error and degrees of freedom, ``t``, ``p``.

    NaN degrees of freedom (too few values) give NaN ``half_width``, ``t`` and ``p``.
    """
    quantile = xr.apply_ufunc(lambda k: stats.t.ppf(0.5 + confidence / 2, k), df)
    half = (quantile * sem).where(df.notnull())
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (mean / sem).where(df.notnull())
    p = xr.apply_ufunc(lambda tt, k: 2 * stats.t.sf(np.abs(tt), k), t, df)
    return xr.Dataset(
        {
            "mean": mean,
            "lower": mean - half,
            "upper": mean + half,
            "half_width": half,
            "t": t,
            "p": p,
        }
    )


def _t_interval(values: xr.DataArray, dim: str, confidence: float) -> xr.Dataset:
    """Mean over ``dim`` of ``values`` (NaN left out) with its t interval, ``t`` and ``p``."""
    n = values.count(dim)
    sem = values.std(dim, ddof=1) / np.sqrt(n.where(n > 0))
    result = _interval(values.mean(dim), sem, n.where(n > 1) - 1, confidence)
    return result.assign(n=n)[["mean", "lower", "upper", "half_width", "n", "t", "p"]]


def mean_ci(values: xr.DataArray, dim: str = "seed", level: float = 0.95) -> xr.Dataset:
    """Mean over ``dim`` with a Student-t confidence interval.

    NaN entries (for example steps without an evaluation) are left out, per
    position; fewer than two values give an infinite-free NaN interval.

    Args:
        values: Any DataArray with a ``dim`` dimension.
        dim: The dimension to average over (the independent replicates).
        level: Confidence level of the interval.

    Returns:
        A Dataset with ``mean``, ``lower``, ``upper``, ``half_width`` and ``n``,
        over the other dims; attrs ``over`` (``dim``), ``confidence`` and ``method``.

    Example:
        >>> da = xr.DataArray([1.0, 2.0, 3.0], dims="seed")
        >>> ci = mean_ci(da)
        >>> float(ci["mean"]), round(float(ci["half_width"]), 3), int(ci["n"])
        (2.0, 2.484, 3)
        >>> ci.attrs["over"]
        'seed'
    """
    _check_confidence(level, "level")
    result = _t_interval(values, dim, level).drop_vars(["t", "p"])
    result.attrs = {
        "over": dim,
        "confidence": level,
        "method": f"Student-t interval for the mean over {dim}",
    }
    return result


def _as_replicates(values: xr.DataArray | np.ndarray | object, dim: str, name: str) -> xr.DataArray:
    """A DataArray as is; an array (or tensor, or list) with its leading axis named ``dim``."""
    if isinstance(values, xr.DataArray):
        if dim not in values.dims:
            raise ValueError(
                f"{name} has dims {values.dims}, not {dim!r}: pass dim= the replicate dim "
                "(the models or seeds the two conditions share)."
            )
        return values
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()  # type: ignore[union-attr]
    array = np.asarray(values, dtype=float)
    if array.ndim == 0:
        raise ValueError(f"{name} is a scalar: pass one value per {dim} along the leading axis.")
    dims = [dim, *(f"axis_{k}" for k in range(1, array.ndim))]
    return xr.DataArray(array, dims=dims)


def paired_t(
    a: xr.DataArray | np.ndarray | object,
    b: xr.DataArray | np.ndarray | object,
    *,
    confidence: float = 0.95,
    dim: str = "model",
) -> xr.Dataset:
    """Paired Student-t interval and test for the mean of ``a - b`` over ``dim``.

    The replicates are paired: entry ``i`` of ``a`` and of ``b`` come from the
    same model (or seed) under two conditions, so the test is the one-sample t
    test of the differences ``d_i = a_i - b_i`` (``scipy.stats.ttest_rel``):
    ``t = mean(d) / (sd(d) / sqrt(n))`` with ``n - 1`` degrees of freedom,
    two-sided ``p``. A pair with a NaN on either side is left out, per
    position. Fewer than two pairs give NaN ``half_width``, ``t`` and ``p``;
    differences that are all equal and nonzero give ``t = ±inf``, ``p = 0``.

    Args:
        a: The first condition: a DataArray with a ``dim`` dim, or an array
            (or tensor) whose leading axis is ``dim``.
        b: The second condition, with the same ``dim`` and the same
            coordinates on it (checked); broadcast over the other dims.
        confidence: Confidence level of the interval.
        dim: The replicate dim the pairs share.

    Returns:
        A Dataset, over the other dims, with ``mean`` (the mean difference
        ``a - b``), ``lower``, ``upper``, ``half_width``, ``n`` (the number of
        pairs), ``t`` and ``p``; attrs ``over`` (``dim``), ``confidence``,
        ``method`` and ``difference`` (``"a - b"``).

    Raises:
        ValueError: If ``confidence`` is not in (0, 1), ``dim`` is missing, or
            ``a`` and ``b`` do not hold the same replicates along ``dim``.

    Example:
        >>> a = xr.DataArray([0.50, 0.61, 0.47, 0.55], dims="model")
        >>> b = xr.DataArray([0.40, 0.52, 0.45, 0.41], dims="model")
        >>> res = paired_t(a, b)
        >>> round(float(res["mean"]), 4), int(res["n"]), res.attrs["over"]
        (0.0875, 4, 'model')
        >>> round(float(res["t"]), 3), round(float(res["p"]), 4)
        (3.506, 0.0393)
    """
    _check_confidence(confidence, "confidence")
    a_da = _as_replicates(a, dim, "a")
    b_da = _as_replicates(b, dim, "b")
    if a_da.sizes[dim] != b_da.sizes[dim]:
        raise ValueError(
            f"a has {a_da.sizes[dim]} entries along {dim!r} and b has {b_da.sizes[dim]}: "
            "pass the same replicates for both conditions."
        )
    try:
        a_da, b_da = xr.align(a_da, b_da, join="exact")
    except ValueError as error:
        raise ValueError(
            f"a and b label their {dim!r} entries differently ({error}): pair the same "
            "replicates, in the same order, for both conditions."
        ) from error
    diff = a_da - b_da
    result = _t_interval(diff, dim, confidence)
    result.attrs = {
        "over": dim,
        "confidence": confidence,
        "method": f"paired Student-t interval for the mean difference over {dim}",
        "difference": "a - b",
    }
    return result


def welch_t(
    a: xr.DataArray | np.ndarray | object,
    b: xr.DataArray | np.ndarray | object,
    *,
    confidence: float = 0.95,
    dim: str = "model",
) -> xr.Dataset:
    """Welch's interval and test for ``mean(a) - mean(b)``, two independent groups.

    For replicates that are *not* paired: the models of two different runs (or
    two codes), each with its own initialisations. Unequal variances are
    allowed (``scipy.stats.ttest_ind(equal_var=False)``): the standard error is
    ``sqrt(s_a²/n_a + s_b²/n_b)`` with Welch-Satterthwaite degrees of freedom.
    NaN entries are left out, per position.

    Args:
        a: The first group: a DataArray with a ``dim`` dim, or an array (or
            tensor) whose leading axis is ``dim``.
        b: The second group, with its own length along ``dim``; broadcast over
            the other dims.
        confidence: Confidence level of the interval.
        dim: The replicate dim of each group.

    Returns:
        A Dataset, over the other dims, with ``mean`` (the difference of the
        means), ``lower``, ``upper``, ``half_width``, ``n_a``, ``n_b``, ``df``,
        ``t`` and ``p``; attrs ``over``, ``confidence``, ``method`` and
        ``difference`` (``"mean(a) - mean(b)"``).

    Raises:
        ValueError: If ``confidence`` is not in (0, 1) or ``dim`` is missing.

    Example:
        >>> a = xr.DataArray([0.50, 0.61, 0.47, 0.55, 0.58], dims="model")
        >>> b = xr.DataArray([0.40, 0.52, 0.45], dims="model")
        >>> res = welch_t(a, b)
        >>> round(float(res["mean"]), 4), int(res["n_a"]), int(res["n_b"])
        (0.0853, 5, 3)
        >>> round(float(res["t"]), 3), round(float(res["p"]), 4)
        (1.976, 0.117)
    """
    _check_confidence(confidence, "confidence")
    a_da = _as_replicates(a, dim, "a").rename({dim: f"{dim}_a"})
    b_da = _as_replicates(b, dim, "b").rename({dim: f"{dim}_b"})
    parts = []
    for da, d in ((a_da, f"{dim}_a"), (b_da, f"{dim}_b")):
        n = da.count(d)
        var = da.var(d, ddof=1) / n.where(n > 1)
        parts.append((da.mean(d), var, n))
    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = parts
    sem = np.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    result = _interval(mean_a - mean_b, sem, df, confidence).assign(n_a=n_a, n_b=n_b, df=df)
    result = result[["mean", "lower", "upper", "half_width", "n_a", "n_b", "df", "t", "p"]]
    result.attrs = {
        "over": dim,
        "confidence": confidence,
        "method": f"Welch interval for the difference of the means over {dim}, two groups",
        "difference": "mean(a) - mean(b)",
    }
    return result
