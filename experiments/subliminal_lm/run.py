"""The experiment's orchestration: seeds, their settings, every condition's students, one file."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import xarray as xr

from gradlens import Recorder, open_run
from gradlens.records import is_complete, make_attrs
from gradlens.records.atomic import atomic_write, atomic_write_text
from subliminal_lm.conditions import Condition, get_conditions
from subliminal_lm.config import LMConfig
from subliminal_lm.figures import save_figures
from subliminal_lm.hf_student import run_student_hf
from subliminal_lm.models import trait_probs
from subliminal_lm.report import summary_markdown, token_dot_mean
from subliminal_lm.setting import Setting, build_setting
from subliminal_lm.student import (
    Student,
    run_student,
    student_coords,
    student_layout,
    student_model,
    student_params,
    student_variables,
)

__all__ = [
    "COMBINED",
    "COMPACT",
    "SEED_RECORDS",
    "STUDENT_TRAINERS",
    "combine",
    "compact",
    "main",
    "part_path",
    "seed_values",
    "settings_key",
    "write_combined",
]

COMBINED = "lm_subliminal.nc"
"""The combined run file's name in the output folder."""

SEED_RECORDS: dict[str, str] = {
    "base_trait_prob": "p(trait answer | question) of the shared base, mean over questions",
    "other_trait_prob": "p(trait answer | question) of the other base, mean over questions",
    "teacher_trait_prob": "p(trait answer | question) of the teacher, mean over questions",
    "base_top_answer_prob": "the base's largest mean answer probability over the answer words",
    "teacher_kept": "fraction of the teacher's samples that are numbers only",
    "base_kept": "fraction of the base's samples that are numbers only",
}
"""What each seed's setting records (dim ``seed``)."""


STUDENT_TRAINERS: dict[str, Callable[[Setting, Condition, LMConfig, Recorder], Student]] = {
    "loop": run_student,
    "hf": run_student_hf,
}
"""What trains a student, by :attr:`LMConfig.trainer <subliminal_lm.LMConfig>`: the same rows."""


def part_path(out: Path, condition: str, seed: int) -> Path:
    """The run file of one student."""
    return out / "parts" / f"{condition}_seed{seed}.nc"


def seed_values(setting: Setting, config: LMConfig) -> dict[str, float]:
    """The :data:`SEED_RECORDS` of one seed's setting."""
    trait = config.vocab.trait

    def probs(model: torch.nn.Module) -> torch.Tensor:
        return trait_probs(model, config.vocab, setting.questions).mean(dim=0)

    base = probs(setting.base)
    return {
        "base_trait_prob": float(base[trait]),
        "other_trait_prob": float(probs(setting.other)[trait]),
        "teacher_trait_prob": float(probs(setting.teacher)[trait]),
        "base_top_answer_prob": float(base.max()),
        "teacher_kept": setting.kept["teacher"],
        "base_kept": setting.kept["base"],
    }


_NOT_SETTINGS = ("seeds", "conditions", "out", "progress", "overwrite", "jobs", "preset")


def settings_key(config: LMConfig) -> dict[str, object]:
    """The fields of ``config`` that a seed's results depend on, as JSON gives them back.

    Tuples are lists, as in a seed's record read back, so the two compare equal.
    The device is one of them (a seed run on another device is run again); the
    preset's name is not (its values are).
    """
    fields = dataclasses.asdict(config)
    return json.loads(json.dumps({k: v for k, v in fields.items() if k not in _NOT_SETTINGS}))


def _seed_done(config: LMConfig, names: list[str], seed: int) -> bool:
    """Whether an earlier run left every part of ``seed``, made with these settings."""
    out = config.out
    record = out / "parts" / f"seed{seed}.json"
    if not record.is_file() or not all(is_complete(part_path(out, n, seed)) for n in names):
        return False
    done = json.loads(record.read_text()).get("settings") == settings_key(config)
    if not done and config.progress:
        print(f"seed {seed}: the parts in {out} were made with other settings; running it again")
    return done


def _run_seed(config: LMConfig, seed: int) -> None:
    torch.set_num_threads(1)
    out = config.out
    setting = build_setting(config, seed)
    train = STUDENT_TRAINERS[config.trainer]
    for condition in get_conditions(config.conditions):
        start = time.monotonic()
        params = student_params(student_model(setting, condition, config))
        layout = student_layout(params)
        with Recorder(
            part_path(out, condition.name, seed),
            student_variables(layout, token_dots=config.token_dots),
            coords=student_coords(params, layout),
            config={"seed": seed, "condition": condition.name},
            overwrite=True,
        ) as recorder:
            final = train(setting, condition, config, recorder).trait_prob
        if config.progress:
            print(
                f"seed {seed} {condition.name:>14}: trait p {final:.4f} "
                f"({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    record = {**seed_values(setting, config), "settings": settings_key(config)}
    atomic_write_text(out / "parts" / f"seed{seed}.json", json.dumps(record))


def combine(config: LMConfig) -> xr.Dataset:
    """Every part of the run in one dataset: dims ``condition`` and ``seed`` added."""
    out, seeds = config.out, list(range(config.seeds))
    by_condition = []
    for name in config.conditions:
        runs = [open_run(part_path(out, name, s)).load() for s in seeds]
        by_condition.append(xr.concat(runs, dim="seed", combine_attrs="override"))
    # a LoRA student's layers and transform groups are its adapters': NaN elsewhere
    ds = xr.concat(by_condition, dim="condition", join="outer", combine_attrs="override")
    ds = ds.assign_coords(condition=list(config.conditions), seed=seeds)
    values = [json.loads((out / "parts" / f"seed{s}.json").read_text()) for s in seeds]
    for name, long_name in SEED_RECORDS.items():
        ds[name] = xr.DataArray([v[name] for v in values], dims="seed").assign_attrs(
            long_name=long_name, units="1"
        )
    ds.attrs = make_attrs(config)
    return ds


COMPACT = "lm_subliminal_compact.nc"
"""The compact run file's name: what the summary and the figure read, small enough to commit."""


def compact(ds: xr.Dataset) -> xr.Dataset:
    """The run without its large records: per-example cosines and per-layer rows dropped.

    Keeps every ``(condition, seed, step)`` record, the mean over steps of
    ``layer_cosine`` (``layer_cosine_mean``), the ``remove_update`` transform's
    global coefficient (``remove_coef``), with ``token_dot`` its mean over
    steps and sequences by token position (``token_dot_mean``), and the seed
    records: the summary and the figures are the same from it.
    """
    keep = [
        name
        for name, var in ds.data_vars.items()
        if var.dims in (("condition", "seed", "step"), ("seed",))
    ]
    coef = ds["transform_coef"].sel(placement="after", transform="remove_update", group="all")
    out = ds[keep].assign(remove_coef=coef.drop_vars(["placement", "transform", "group"]))
    out["remove_coef"].attrs = {
        "long_name": "remove_update: coefficient of the update's component along -g_t removed",
        "units": "1",
    }
    out["layer_cosine_mean"] = ds["layer_cosine"].mean("step")
    out["layer_cosine_mean"].attrs = {"long_name": "cos(g_t, g) per layer, mean over steps"}
    dots = token_dot_mean(ds)
    if dots is not None:
        out["token_dot_mean"] = dots
    out.encoding = {}
    return out


def write_combined(ds: xr.Dataset, path: Path) -> Path:
    """Write the combined dataset atomically, every data variable zlib-compressed."""
    encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars}
    return atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding))


def main(config: LMConfig) -> Path:
    """Run every seed and condition; write the combined file, the summary and the figures.

    A seed whose parts are all complete, made with the same settings (an
    interrupted run with the same out folder), is not run again; parts made
    with other settings are run again. With ``config.jobs`` above 1 the seeds
    run in that many processes (one thread each).

    Returns:
        The combined run file.

    Raises:
        FileExistsError: If the combined file exists and ``config.overwrite`` is not set.
    """
    out = config.out
    combined = out / COMBINED
    if combined.exists() and not config.overwrite:
        raise FileExistsError(f"{combined} exists: pass --overwrite, or another --out.")
    (out / "parts").mkdir(parents=True, exist_ok=True)
    names = [c.name for c in get_conditions(config.conditions)]
    todo = [seed for seed in range(config.seeds) if not _seed_done(config, names, seed)]
    if config.jobs == 1:
        for seed in todo:
            _run_seed(config, seed)
    else:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(config.jobs, len(todo) or 1), mp_context=spawn) as pool:
            list(pool.map(_run_seed, [config] * len(todo), todo))
    ds = combine(config)
    write_combined(ds, combined)
    write_combined(compact(ds), out / COMPACT)
    atomic_write_text(out / "summary.md", summary_markdown(ds))
    save_figures(ds, out)
    return combined
