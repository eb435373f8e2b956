from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats

from gradlens.stats import mean_ci, paired_t, welch_t


def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5, 0.1, n)
    return a, a - rng.normal(0.03, 0.05, n)


@pytest.mark.parametrize(("n", "seed"), [(2, 0), (5, 1), (25, 2), (100, 3)])
def test_paired_t_matches_scipy_ttest_rel(n: int, seed: int) -> None:
    a, b = draw(n, seed)
    res = paired_t(xr.DataArray(a, dims="model"), xr.DataArray(b, dims="model"))
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert float(res["t"]) == pytest.approx(ref.statistic, rel=1e-10)
    assert float(res["p"]) == pytest.approx(ref.pvalue, rel=1e-8)
    assert float(res["lower"]) == pytest.approx(ci.low, rel=1e-10)
    assert float(res["upper"]) == pytest.approx(ci.high, rel=1e-10)
    assert int(res["n"]) == n


def test_paired_t_by_hand() -> None:
    # d = (1, 2, 3, 6): mean 3, sd sqrt(14/3), sem sqrt(14/3)/2, t = 3/sem, df = 3.
    res = paired_t(np.array([2.0, 4.0, 6.0, 10.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    sem = math.sqrt(14 / 3) / 2
    assert float(res["mean"]) == pytest.approx(3.0)
    assert float(res["t"]) == pytest.approx(3 / sem)
    assert float(res["half_width"]) == pytest.approx(3.182446305284263 * sem)  # t_{0.975, 3}
    assert float(res["p"]) == pytest.approx(2 * stats.t.sf(3 / sem, 3))
    assert res.attrs["over"] == "model" and res.attrs["difference"] == "a - b"
    assert res.attrs["confidence"] == 0.95


def test_paired_t_is_the_mean_ci_of_the_differences() -> None:
    a, b = draw(12, 4)
    res = paired_t(a, b, confidence=0.9)
    ci = mean_ci(xr.DataArray(a - b, dims="model"), dim="model", level=0.9)
    for name in ("mean", "lower", "upper", "half_width", "n"):
        assert float(res[name]) == pytest.approx(float(ci[name]), rel=1e-12)


def test_paired_t_reduces_only_the_replicate_dim_and_drops_nan_pairs() -> None:
    rng = np.random.default_rng(5)
    a = xr.DataArray(rng.normal(size=(6, 3)), dims=("model", "condition"))
    b = xr.DataArray(rng.normal(size=(6, 3)), dims=("model", "condition"))
    a[0, 1] = np.nan
    b[2, 1] = np.nan
    res = paired_t(a, b)
    assert res["mean"].dims == ("condition",)
    assert res["n"].values.tolist() == [6, 4, 6]
    keep = ~(np.isnan(a[:, 1]) | np.isnan(b[:, 1])).values
    ref = stats.ttest_rel(a[:, 1].values[keep], b[:, 1].values[keep])
    assert float(res["t"][1]) == pytest.approx(ref.statistic, rel=1e-10)


def test_paired_t_takes_tensors_with_the_replicate_axis_first() -> None:
    a, b = draw(8, 6)
    res = paired_t(torch.tensor(a), torch.tensor(b), dim="seed")
    assert res.attrs["over"] == "seed"
    assert float(res["t"]) == pytest.approx(stats.ttest_rel(a, b).statistic, rel=1e-10)


def test_paired_t_edge_cases() -> None:
    one = paired_t(np.array([1.0]), np.array([0.0]))
    assert int(one["n"]) == 1 and np.isnan(float(one["half_width"])) and np.isnan(float(one["p"]))
    same = paired_t(np.array([2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0]))
    assert float(same["t"]) == math.inf and float(same["p"]) == 0.0
    assert float(same["half_width"]) == 0.0


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (xr.DataArray([1.0, 2.0], dims="seed"), xr.DataArray([1.0, 2.0], dims="seed"), {}, "dim="),
        (np.ones(3), np.ones(4), {}, "same replicates"),
        (np.ones(3), np.ones(3), {"confidence": 1.0}, "confidence"),
        (np.float64(1.0), np.float64(1.0), {}, "scalar"),
        (
            xr.DataArray([1.0, 2.0], dims="model", coords={"model": [0, 1]}),
            xr.DataArray([1.0, 2.0], dims="model", coords={"model": [1, 2]}),
            {},
            "label",
        ),
    ],
)
def test_paired_t_validates(a: object, b: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_t(a, b, **kwargs)


def test_mean_ci_says_what_it_is_over() -> None:
    ci = mean_ci(xr.DataArray([[1.0, 2.0], [3.0, 5.0]], dims=("model", "step")), dim="model")
    assert ci.attrs["over"] == "model" and ci.attrs["confidence"] == 0.95
    assert ci["mean"].dims == ("step",)
    assert set(ci.data_vars) == {"mean", "lower", "upper", "half_width", "n"}


@pytest.mark.parametrize(("n_a", "n_b", "seed"), [(5, 3, 0), (25, 125, 1), (40, 7, 2)])
def test_welch_t_matches_scipy_ttest_ind_with_unequal_variances(
    n_a: int, n_b: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.5, 0.1, n_a), rng.normal(0.45, 0.2, n_b)
    res = welch_t(xr.DataArray(a, dims="model"), b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert float(res["mean"]) == pytest.approx(a.mean() - b.mean())
    assert float(res["t"]) == pytest.approx(ref.statistic)
    assert float(res["p"]) == pytest.approx(ref.pvalue)
    low, high = ref.confidence_interval(0.95)
    assert (float(res["lower"]), float(res["upper"])) == pytest.approx((low, high))
    assert (int(res["n_a"]), int(res["n_b"])) == (n_a, n_b)
    assert res.attrs["over"] == "model"


def test_welch_t_leaves_nan_out_and_keeps_other_dims() -> None:
    a = xr.DataArray([[0.1, 1.0], [0.3, 2.0], [np.nan, 3.0]], dims=("model", "x"))
    b = xr.DataArray([[0.0, 0.0], [0.2, 1.0]], dims=("model", "x"))
    res = welch_t(a, b)
    assert res["mean"].dims == ("x",)
    assert res["n_a"].values.tolist() == [2, 3]
    assert float(res["mean"][0]) == pytest.approx(0.2 - 0.1)
    with pytest.raises(ValueError, match="not 'model'"):
        welch_t(xr.DataArray([1.0, 2.0], dims="seed"), b)
