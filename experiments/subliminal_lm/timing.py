"""The wall time of the two student trainers on the same settings, in one process.

:func:`time_trainers` builds each seed's setting once and trains every
condition's student with each trainer of
:data:`~subliminal_lm.run.STUDENT_TRAINERS` in turn (alternating which goes
first), so both see the same load; it also checks that the two give the same
final trait probability. ``experiments/lm_trainer_timing.py`` runs it on
``--quick`` and writes the JSON that docs/lm_experiment.md quotes.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch

from gradlens import Recorder
from subliminal_lm.conditions import get_conditions
from subliminal_lm.config import LMConfig
from subliminal_lm.run import STUDENT_TRAINERS, settings_key
from subliminal_lm.setting import build_setting
from subliminal_lm.student import student_coords, student_layout, student_variables

__all__ = ["time_trainers"]


def time_trainers(config: LMConfig) -> dict[str, Any]:
    """Train every student of ``config`` with each trainer; time each (one thread).

    Returns:
        JSON-ready: ``setting_s`` (building the seeds' settings), ``students_s``
        (by trainer, the sum over students of the wall time), ``students_cpu_s``
        (the same in this process's CPU time, less sensitive to other jobs on
        the machine), ``per_student_s`` (by trainer, one list in
        seed-then-condition order), ``ratio`` and ``cpu_ratio`` (hf over loop),
        ``max_trait_prob_gap`` (the largest difference of a final trait
        probability between the trainers), the settings and the machine.
    """
    torch.set_num_threads(1)
    trainers = list(STUDENT_TRAINERS)
    per_student: dict[str, list[float]] = {name: [] for name in trainers}
    cpu: dict[str, float] = dict.fromkeys(trainers, 0.0)
    gap, setting_s = 0.0, 0.0
    turn = 0
    for seed in range(config.seeds):
        start = time.perf_counter()
        setting = build_setting(config, seed)
        setting_s += time.perf_counter() - start
        params = dict(setting.base.named_parameters())
        layout = student_layout(params)
        for condition in get_conditions(config.conditions):
            finals = {}
            order = trainers if turn % 2 == 0 else trainers[::-1]
            turn += 1
            for name in order:
                with Recorder(
                    None, student_variables(layout), coords=student_coords(params, layout)
                ) as recorder:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    student = STUDENT_TRAINERS[name](setting, condition, config, recorder)
                    per_student[name].append(time.perf_counter() - start)
                    cpu[name] += time.process_time() - start_cpu
                finals[name] = student.trait_prob
            gap = max(gap, abs(finals["hf"] - finals["loop"]))
    students = {name: sum(times) for name, times in per_student.items()}
    return {
        "setting_s": setting_s,
        "students_s": students,
        "students_cpu_s": cpu,
        "per_student_s": per_student,
        "ratio": students["hf"] / students["loop"],
        "cpu_ratio": cpu["hf"] / cpu["loop"],
        "max_trait_prob_gap": gap,
        "settings": {k: v for k, v in settings_key(config).items() if k != "trainer"}
        | {"seeds": config.seeds},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
