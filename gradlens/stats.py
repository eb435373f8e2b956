"""Means with confidence intervals over seeds."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats

__all__ = ["mean_ci"]


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
        over the other dims.

    Example:
        >>> da = xr.DataArray([1.0, 2.0, 3.0], dims="seed")
        >>> ci = mean_ci(da)
        >>> float(ci["mean"]), round(float(ci["half_width"]), 3), int(ci["n"])
        (2.0, 2.484, 3)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    n = values.count(dim)
    mean = values.mean(dim)
    sem = values.std(dim, ddof=1) / np.sqrt(n.where(n > 0))
    quantile = xr.apply_ufunc(
        lambda k: stats.t.ppf(0.5 + level / 2, np.where(k > 1, k - 1, np.nan)), n
    )
    half = (quantile * sem).where(n > 1)
    return xr.Dataset(
        {"mean": mean, "lower": mean - half, "upper": mean + half, "half_width": half, "n": n}
    )
