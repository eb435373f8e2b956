"""One seed's setting of an LM preset: does its base write numbers, its teacher take the trait?

Builds the bases, the teacher and their number data of one seed (no students) and
writes the seed's records (``subliminal_lm.SEED_RECORDS``) and the wall time as JSON.
See docs/lm_experiment.md ("Devices and sizes").

    python experiments/lm_setting_check.py --size gpu --device cpu --out setting.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from gradlens.records.atomic import atomic_write_text
from subliminal_lm import PRESETS, build_setting, preset, seed_values
from subliminal_mnist.resume import check_device


def main(argv: list[str]) -> Path:
    """Build one seed's setting of ``--size`` on ``--device``; write its records to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=PRESETS, default="gpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(1)
    config = dataclasses.replace(preset(args.size), device=args.device)
    start = time.monotonic()
    setting = build_setting(config, args.seed)
    record = {
        **seed_values(setting, config),
        "sequences_each": int(setting.teacher_numbers.shape[0]),
        "wall_s": round(time.monotonic() - start, 1),
        "threads": 1,
        "seed": args.seed,
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "command": shlex.join(["python", "experiments/lm_setting_check.py", *argv]),
    }
    return atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    print(f"wrote {main(sys.argv[1:])}")
