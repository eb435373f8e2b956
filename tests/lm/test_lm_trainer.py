"""Students trained through transformers.Trainer (--trainer hf) equal the probed_step loop's.

On a tiny setting in float64, every condition's student is trained both ways;
every record and every parameter must agree. The tolerance is float32's, not
float64's: the Llama RMSNorm computes in float32 whatever the model's dtype
(``hidden_states.to(torch.float32)``), so two exact float64 paths whose sums
were ordered differently upstream of a norm may differ by a float32 rounding
there (about 1e-7 relative, grown a little by the steps). Here they agree to the
last bit, as the two paths run the same operations on the same batches.
"""

import dataclasses

import lm_subliminal
import numpy as np
import pytest
import torch
import xarray as xr

from gradlens import Recorder
from subliminal_lm import (
    CONDITIONS,
    DEFAULT_CONDITIONS,
    STUDENT_TRAINERS,
    Student,
    build_setting,
    run_student,
    run_student_hf,
    settings_key,
    student_coords,
    student_layout,
    student_variables,
)
from subliminal_lm.setting import Setting
from subliminal_lm.timing import time_trainers

from .test_lm_setting import tiny_config

RTOL, ATOL = 1e-5, 1e-7  # float32 rounding: see the module docstring

# records with a value at every trained step (or every example), for any condition
ALWAYS = {
    "trait_prob",
    "train_loss",
    "trait_loss",
    "cosine",
    "projection",
    "layer_cosine",
    "update_cosine",
    "predicted_change",
    "measured_change",
    "example_cosine",
    "example_cosine_mean",
    "teacher_cosine",
    "drift_cosine",
    "update_norm",
    "drift_norm",
}


@pytest.fixture(scope="module")
def setting64() -> Setting:
    torch.set_num_threads(1)
    s = build_setting(tiny_config(), seed=0)
    return s._replace(
        base=s.base.double(),
        other=s.other.double(),
        teacher=s.teacher.double(),
        displacement={k: v.double() for k, v in s.displacement.items()},
    )


def train(setting: Setting, name: str, trainer: str) -> tuple[xr.Dataset, Student]:
    params = dict(setting.base.named_parameters())
    layout = student_layout(params)
    with Recorder(None, student_variables(layout), coords=student_coords(params, layout)) as rec:
        student = STUDENT_TRAINERS[trainer](setting, CONDITIONS[name], tiny_config(), rec)
    return rec.dataset(), student


@pytest.mark.parametrize("name", DEFAULT_CONDITIONS)
def test_the_trainer_gives_the_loops_records_and_parameters(setting64: Setting, name: str) -> None:
    (loop, a), (hf, b) = train(setting64, name, "loop"), train(setting64, name, "hf")
    assert a.model.dtype == b.model.dtype == torch.float64
    checked = set()
    for var in loop.data_vars:
        x, y = loop[var].values, hf[var].values
        assert x.shape == y.shape, var
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=var)
        if np.isfinite(x).any():
            np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL, err_msg=var)
            checked.add(var)
    assert checked >= ALWAYS, ALWAYS - checked
    if name == "remove_update":
        assert {"transform_coef", "transform_cosine"} <= checked
    steps = tiny_config().student_steps
    assert np.isfinite(loop["cosine"].values[:steps]).all()
    assert np.abs(loop["drift_norm"].values[steps - 1]) > 0  # the students moved
    for (n, p), (m, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert n == m
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL, msg=n)
    assert b.trait_prob == pytest.approx(a.trait_prob, rel=RTOL)


def test_the_runners_are_the_two_trainers() -> None:
    assert {"loop": run_student, "hf": run_student_hf} == STUDENT_TRAINERS
    config = tiny_config()
    assert config.trainer == "hf"  # tests/lm/test_lm_quick.py runs main through the Trainer
    loop = dataclasses.replace(config, trainer="loop")
    assert settings_key(loop)["trainer"] == "loop" and settings_key(config) != settings_key(loop)
    assert lm_subliminal.parse(["--trainer", "loop"]).trainer == "loop"
    assert lm_subliminal.parse([]).trainer == "hf"


def test_the_timing_trains_each_student_with_both_trainers() -> None:
    timing = time_trainers(tiny_config(seeds=1, conditions=("sgd", "remove_update")))
    assert [len(timing["per_student_s"][t]) for t in ("loop", "hf")] == [2, 2]
    assert timing["ratio"] > 0 and timing["cpu_ratio"] > 0 and timing["setting_s"] > 0
    assert timing["max_trait_prob_gap"] < RTOL  # float32 here: the same students
    assert timing["settings"]["seeds"] == 1 and "trainer" not in timing["settings"]
