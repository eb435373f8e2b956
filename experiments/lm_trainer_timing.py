"""Wall time of the LM students through the plain loop and through transformers.Trainer.

Both trainers train every ``--quick`` student on the same settings in this one
process (one thread), alternating which goes first; see subliminal_lm.timing.

    python experiments/lm_trainer_timing.py --out docs/results/lm_subliminal/trainer_timing.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from subliminal_lm import LMConfig, quick
from subliminal_lm.timing import time_trainers


def main(argv: list[str]) -> Path:
    """Time both trainers on ``--quick`` and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    result = time_trainers(quick(LMConfig(progress=False)))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result["commit"] = head.stdout.strip() or None
    result["command"] = "python experiments/lm_trainer_timing.py " + " ".join(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return args.out


if __name__ == "__main__":
    print(f"wrote {main(sys.argv[1:])}")
