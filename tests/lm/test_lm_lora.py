"""The LoRA conditions, several epochs over the data and token-level alignment, on a tiny config."""

import copy
import dataclasses
from pathlib import Path

import lm_subliminal
import numpy as np
import peft
import pytest
import torch
import xarray as xr

from gradlens import Recorder
from gradlens.stats import mean_ci
from gradlens.training.losses import token_mean
from subliminal_lm import (
    COMPACT,
    CONDITIONS,
    FIGURES,
    LMConfig,
    build_setting,
    main,
    run_student,
    run_student_hf,
    student_coords,
    student_data,
    student_layout,
    student_model,
    student_params,
    student_variables,
    summary_markdown,
    trait_objective,
    weights,
)
from subliminal_lm.setting import Setting

from .test_lm_setting import tiny_config

LORA_CONDITIONS = ("same_init", "base_numbers", "lora", "lora_base_numbers")


def epochs_config(**changes: object) -> LMConfig:
    """Four steps of four sequences over eight distinct sequences: two epochs."""
    return tiny_config(student_steps=4, student_epochs=2, trainer="loop", **changes)


@pytest.fixture(scope="module")
def setting64() -> Setting:
    torch.set_num_threads(1)
    s = build_setting(epochs_config(), seed=3)
    return s._replace(
        base=s.base.double(),
        other=s.other.double(),
        teacher=s.teacher.double(),
        displacement={k: v.double() for k, v in s.displacement.items()},
    )


def test_a_lora_student_trains_only_its_adapters_from_its_base(setting64: Setting) -> None:
    config = epochs_config()
    model = student_model(setting64, CONDITIONS["lora"], config)
    trained = student_params(model)
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained}
    assert modules == set(config.lora_targets)
    assert all(p.dtype == torch.float64 for p in trained.values())
    # B = 0: the student computes what its base does, and its merged weights are the base's
    ids = setting64.questions[:5]
    torch.testing.assert_close(model(input_ids=ids).logits, setting64.base(input_ids=ids).logits)
    base = dict(setting64.base.named_parameters())
    start = weights(model)
    assert start.keys() == base.keys()
    for name, w in start.items():
        torch.testing.assert_close(w, base[name].detach(), rtol=0, atol=0)
    # the adapters' A is the seed's own draw: another seed's differs
    other = student_model(setting64._replace(seed=setting64.seed + 1), CONDITIONS["lora"], config)
    a = next(p for n, p in trained.items() if "lora_A" in n)
    b = next(p for n, p in student_params(other).items() if "lora_A" in n)
    assert not torch.equal(a, b)


def test_weights_merge_the_adapters_as_peft_does(setting64: Setting) -> None:
    model = student_model(setting64, CONDITIONS["lora"], epochs_config())
    with torch.no_grad():
        for n, p in student_params(model).items():
            p.normal_(generator=torch.Generator().manual_seed(len(n)))  # B != 0
    merged = weights(model)
    oracle = dict(peft_copy_merged(model).named_parameters())
    assert merged.keys() == oracle.keys()
    moved = 0
    for name, w in merged.items():
        torch.testing.assert_close(w, oracle[name].detach(), rtol=1e-12, atol=1e-12)
        moved += not torch.equal(w, dict(setting64.base.named_parameters())[name])
    assert moved == 2 * len(epochs_config().lora_targets)  # every adapted linear layer


def peft_copy_merged(model: peft.PeftModel) -> torch.nn.Module:
    """peft's own merge, on a copy: the oracle of :func:`weights`."""
    return copy.deepcopy(model).merge_and_unload()


def train64(setting: Setting, name: str) -> tuple[xr.Dataset, torch.nn.Module]:
    config = epochs_config(token_dots=True)
    model = student_model(setting, CONDITIONS[name], config)
    params = student_params(model)
    layout = student_layout(params)
    variables = student_variables(layout, token_dots=True)
    with Recorder(None, variables, coords=student_coords(params, layout)) as rec:
        student = run_student(setting, CONDITIONS[name], config, rec)
    return rec.dataset(), student.model


def test_the_lora_probes_are_over_the_adapters(setting64: Setting) -> None:
    """Step 0's g_t . update and cos(g_t, g), against autograd in float64 over the adapters."""
    config = epochs_config()
    ds, trained = train64(setting64, "lora")
    model = student_model(setting64, CONDITIONS["lora"], config)  # the student before step 0
    params = student_params(model)
    trait = trait_objective(setting64, config)
    logits = model(**trait.inputs).logits
    g_t = torch.autograd.grad(token_mean(logits, *trait.targets), list(params.values()))
    data = student_data(setting64, CONDITIONS["lora"], config)
    rows = slice(0, config.student_batch)
    loss = token_mean(model(input_ids=data["input_ids"][rows]).logits, data["labels"][rows])
    g = torch.autograd.grad(loss, list(params.values()))
    flat_t, flat_g = torch.cat([t.flatten() for t in g_t]), torch.cat([t.flatten() for t in g])
    cos = float(flat_t @ flat_g / (flat_t.norm() * flat_g.norm()))
    assert float(ds["cosine"][0]) == pytest.approx(cos, rel=1e-6, abs=1e-12)
    assert float(ds["trait_norm"][0]) == pytest.approx(float(flat_t.norm()), rel=1e-6)
    # B = 0 at the start: the gradient reaches B only
    assert all(t.abs().max() == 0 for n, t in zip(params, g_t, strict=True) if "lora_A" in n)
    # the step's update: Adam's first step, -lr * sign(g) (up to eps), over the adapters
    update = -config.lora_lr * flat_g / (flat_g.abs() + 1e-8)
    assert float(ds["predicted_change"][0]) == pytest.approx(float(flat_t @ update), rel=1e-5)
    assert float(ds["drift_norm"][0]) > 0  # the merged weights moved
    # the base weights never move
    for n, p in trained.named_parameters():
        if "lora_" not in n:
            assert not p.requires_grad
            base = n.replace("base_model.model.", "", 1).replace(".base_layer.", ".")
            torch.testing.assert_close(p, dict(setting64.base.named_parameters())[base])


def test_token_dots_sum_to_the_batch_dot(setting64: Setting) -> None:
    ds, _ = train64(setting64, "same_init")
    steps = epochs_config().student_steps
    trained = ds.isel(step=slice(0, steps))
    dots = trained["token_dot"]
    assert dots.dims == ("step", "example", "token")
    # a row sums to the sequence's <grad l_i, g_t>; their mean is <g, g_t>. The records
    # are stored in float32: each term is rounded to about 6e-8 of itself
    terms = dots.astype(np.float64)
    batch_dot = terms.sum("token").mean("example")
    expected = trained["projection"].astype(np.float64) * trained["trait_norm"] ** 2
    scale = np.abs(terms).sum("token").mean("example")
    assert (np.abs(batch_dot - expected) <= 1e-6 * scale + 1e-6 * np.abs(expected)).all()
    prompt = 2 + epochs_config().prompt_numbers
    assert (dots.isel(token=slice(0, prompt)) == 0).all()  # the prompt carries no loss
    assert (dots.isel(token=slice(prompt, None)) != 0).any()


def test_the_data_repeat_once_per_epoch(setting64: Setting) -> None:
    config = epochs_config()
    data = student_data(setting64, CONDITIONS["same_init"], config)
    n = config.sequences
    assert n == 8 and data["input_ids"].shape[0] == 16
    torch.testing.assert_close(data["input_ids"][:n], setting64.teacher_numbers[:n])
    torch.testing.assert_close(data["input_ids"][n:], data["input_ids"][:n])
    with pytest.raises(ValueError, match=r"student_epochs=3 must be at least 1 and divide the 16"):
        tiny_config(student_steps=4, student_epochs=3)
    with pytest.raises(ValueError, match=r"token_dot in the plain probed_step loop only"):
        tiny_config(token_dots=True)  # the Trainer path


def test_the_script_maps_the_new_flags(capsys: pytest.CaptureFixture[str]) -> None:
    config = lm_subliminal.parse(
        ["--student-steps", "40", "--student-epochs", "4", "--trainer", "loop", "--token-dots"]
    )
    assert (config.student_epochs, config.sequences, config.token_dots) == (4, 160, True)
    assert lm_subliminal.parse(["--conditions", "lora"]).conditions == ("lora",)
    with pytest.raises(SystemExit):
        lm_subliminal.parse(["--token-dots"])
    assert "--token-dots needs --trainer loop." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lm_subliminal.parse(["--student-steps", "10", "--student-epochs", "3"])
    assert "student_epochs=3 must be at least 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lm_lora")
    main(epochs_config(seeds=2, out=out, conditions=LORA_CONDITIONS, token_dots=True))
    return out


def test_a_run_with_lora_and_token_dots_summarises_them(lora_run: Path) -> None:
    small = xr.load_dataset(lora_run / COMPACT)
    assert list(small.condition.values) == list(LORA_CONDITIONS)
    assert small["token_dot_mean"].dims == ("condition", "seed", "token")
    assert np.isfinite(small["predicted_change"].sel(condition="lora").isel(step=0)).all()
    text = summary_markdown(small)
    assert text == (lora_run / "summary.md").read_text()
    assert "| lora - lora_base_numbers |" in text and "| same_init - base_numbers |" in text
    assert "## Per-token alignment" in text and "position 5 |" in text
    assert "position 4 |" not in text  # the prompt's last token carries no loss
    drive = mean_ci(small["predicted_change"].sel(condition="lora").sum("step"), dim="seed")
    measured = mean_ci(small["measured_change"].sel(condition="lora").sum("step"), dim="seed")
    cells = [f"{float(c['mean']):.4f} ± {float(c['half_width']):.4f}" for c in (drive, measured)]
    assert f"| lora | {cells[0]} | {cells[1]} |" in text
    for name in FIGURES:
        assert (lora_run / name).stat().st_size > 0, name


def test_the_lora_student_matches_through_the_trainer(setting64: Setting) -> None:
    config = dataclasses.replace(epochs_config(), trainer="hf")
    loop, _ = train64(setting64, "lora")
    model = student_model(setting64, CONDITIONS["lora"], config)
    params = student_params(model)
    layout = student_layout(params)
    with Recorder(None, student_variables(layout), coords=student_coords(params, layout)) as rec:
        run_student_hf(setting64, CONDITIONS["lora"], config, rec)
    hf = rec.dataset()
    for var in ("cosine", "predicted_change", "teacher_cosine", "drift_cosine", "trait_prob"):
        np.testing.assert_allclose(hf[var], loop[var], rtol=1e-5, atol=1e-7, err_msg=var)
