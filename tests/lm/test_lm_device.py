"""--device and --size: the device is checked and threaded through; the presets' values."""

import dataclasses
import json
from pathlib import Path

import lm_setting_check
import lm_subliminal
import numpy as np
import pytest
import torch
import xarray as xr

from gradlens import Recorder
from gradlens.records.provenance import config_to_json
from subliminal_lm import (
    COMPACT,
    CONDITIONS,
    STUDENT_TRAINERS,
    LMConfig,
    ModelSize,
    build_model,
    clone_model,
    flat_params,
    preset,
    settings_key,
    student_arguments,
    student_coords,
    student_layout,
    student_variables,
)
from subliminal_lm.setting import Setting

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "results" / "lm_subliminal" / COMPACT


def test_a_device_that_is_not_one_or_not_here_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        lm_subliminal.parse(["--device", "tpuz"])
    assert "--device 'tpuz' is not a torch device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lm_subliminal.parse(["--device", "cuda:99"])
    assert "--device 'cuda:99' is not available on this machine" in capsys.readouterr().err
    default = "cuda" if torch.cuda.is_available() else "cpu"
    assert lm_subliminal.parse([]).device == default
    assert lm_subliminal.parse(["--device", "cpu"]).device == "cpu"


def test_size_cpu_is_the_old_default_and_the_committed_runs_settings() -> None:
    cpu = lm_subliminal.parse(["--size", "cpu", "--device", "cpu"])
    assert cpu == lm_subliminal.parse(["--device", "cpu"]) == LMConfig() == preset("cpu")
    # every setting the committed run stored is the default's (that run predates some fields)
    stored = json.loads(xr.open_dataset(COMMITTED).attrs["config"])
    mine = json.loads(config_to_json(LMConfig()))
    flags = {"jobs", "out", "overwrite", "progress"}  # the command's, not settings
    assert {k: v for k, v in stored.items() if k not in flags} == {
        k: mine[k] for k in stored if k not in flags
    }


def test_size_gpu_is_the_larger_run_and_says_so() -> None:
    gpu = lm_subliminal.parse(["--size", "gpu", "--device", "cpu"])
    assert gpu == dataclasses.replace(preset("gpu"), device="cpu")
    assert gpu.size == ModelSize(hidden=256, intermediate=512, layers=4, heads=4, positions=32)
    assert (gpu.pretrain_steps, gpu.pretrain_batch, gpu.teacher_steps) == (600, 64, 200)
    assert (gpu.student_steps, gpu.student_batch, gpu.sequences) == (300, 32, 9600)
    assert gpu.probe_questions == 128 and gpu.preset == "gpu"
    # the flags still change it; --quick shortens it
    assert lm_subliminal.parse(["--size", "gpu", "--student-steps", "50"]).student_steps == 50
    assert lm_subliminal.parse(["--size", "gpu", "--quick"]).student_steps == 30
    # the run's config says what made it; a seed run on another device is run again
    stored = json.loads(config_to_json(gpu))
    assert (stored["preset"], stored["device"]) == ("gpu", "cpu")
    assert settings_key(gpu)["device"] == "cpu" and "preset" not in settings_key(gpu)
    with pytest.raises(ValueError, match=r"unknown size preset 'tpu'; choose from"):
        preset("tpu")


def gpu_sized_setting(config: LMConfig) -> Setting:
    """A setting of the gpu preset's model, its weights random, its data tiny (no training)."""
    vocab = config.vocab
    base = build_model(vocab, config.size, 0, config.device)
    teacher = clone_model(base)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    numbers = vocab.rule_sequences(config.sequences, config.prompt_numbers + config.new_tokens, g)
    questions = vocab.all_questions()
    start, moved = flat_params(base), flat_params(teacher)
    return Setting(
        base,
        build_model(vocab, config.size, 1, config.device),
        teacher,
        numbers,
        numbers.flip(0),
        {"teacher": 1.0, "base": 1.0},
        questions,
        torch.arange(config.probe_questions),
        {n: moved[n] - start[n] for n in start},
    )


@pytest.mark.parametrize("trainer", sorted(STUDENT_TRAINERS))
def test_the_gpu_presets_model_takes_a_student_step_on_the_cpu(trainer: str) -> None:
    torch.set_num_threads(1)
    config = dataclasses.replace(
        lm_subliminal.parse(["--size", "gpu", "--device", "cpu", "--trainer", trainer]),
        student_steps=1,
        student_batch=4,
        probe_questions=8,
    )
    setting = gpu_sized_setting(config)
    assert setting.base.config.hidden_size == 256 and setting.base.config.num_hidden_layers == 4
    params = dict(setting.base.named_parameters())
    layout = student_layout(params)
    with Recorder(None, student_variables(layout), coords=student_coords(params, layout)) as rec:
        student = STUDENT_TRAINERS[trainer](setting, CONDITIONS["same_init"], config, rec)
    ds = rec.dataset()
    assert ds.sizes["step"] == 2 and np.isfinite(ds["cosine"].isel(step=0)).all()
    assert 0 < student.trait_prob < 1
    assert all(p.device.type == "cpu" for p in student.model.parameters())


def test_the_trainer_refuses_a_device_other_than_the_models(tmp_path: Path) -> None:
    config = LMConfig(size=ModelSize(hidden=8, intermediate=8, layers=1, heads=1))
    model = build_model(config.vocab, config.size, 0)
    args = student_arguments(model, config, str(tmp_path))
    assert args.use_cpu and args.device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"would train on cpu .* not on the model's device meta"):
        student_arguments(model.to("meta"), config, str(tmp_path))


def test_the_setting_check_refuses_a_device_that_is_not_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        lm_setting_check.main(["--device", "cuda:99", "--out", str(tmp_path / "x.json")])
    assert "--device 'cuda:99' is not available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
