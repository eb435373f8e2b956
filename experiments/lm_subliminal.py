"""Subliminal learning in a small language model, probed at every student step.

Cloud et al. 2025's number setting at toy scale: a teacher fine-tuned from a
tiny Llama-style base to prefer one answer writes number sequences; students
fine-tuned on them are probed with gradlens every step. See docs/lm_experiment.md.

    python experiments/lm_subliminal.py --jobs 2     # 10 seeds x 6 conditions (reduced CPU run)
    python experiments/lm_subliminal.py --quick      # about a minute on one CPU core
    python experiments/lm_subliminal.py --quick --trainer loop   # a plain probed_step loop
    python experiments/lm_subliminal.py --seeds 3 --conditions same_init base_numbers
    python experiments/lm_subliminal.py --size gpu --device cuda --jobs 4   # the larger run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from subliminal_lm import CONDITIONS, DEFAULT_CONDITIONS, PRESETS, LMConfig, main, preset, quick
from subliminal_mnist.resume import check_device


def parse(argv: list[str] | None = None) -> LMConfig:
    """Map command-line flags onto an :class:`LMConfig` (defaults: the reduced CPU run).

    ``--size`` picks the preset (:func:`~subliminal_lm.preset`) the other flags
    change; ``--device`` defaults to ``cuda`` where a GPU is visible, else ``cpu``.
    """
    default = LMConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, short runs (~1 min)")
    parser.add_argument(
        "--size",
        choices=PRESETS,
        default="cpu",
        help="cpu: the reduced run (the committed results); gpu: a larger model, more "
        "pretraining and longer students, for one GPU (docs/lm_experiment.md)",
    )
    parser.add_argument(
        "--device", help="torch device of everything the run trains (default cuda when available)"
    )
    parser.add_argument("--seeds", type=int, help=f"replicates (default {default.seeds})")
    parser.add_argument(
        "--conditions", nargs="+", choices=sorted(CONDITIONS), default=list(DEFAULT_CONDITIONS)
    )
    parser.add_argument("--student-steps", type=int, help="probed steps per student")
    parser.add_argument(
        "--student-epochs", type=int, help="passes over the student's data (default 1)"
    )
    parser.add_argument(
        "--token-dots",
        action="store_true",
        help="record token_dot (step, example, token); needs --trainer loop",
    )
    parser.add_argument("--lr", type=float, help="Adam learning rate of the students")
    parser.add_argument("--sgd-lr", type=float, help="learning rate of the sgd condition")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (processes)")
    parser.add_argument(
        "--trainer",
        choices=["loop", "hf"],
        default=default.trainer,
        help="train students through transformers.Trainer with gradlens's callback (hf, "
        "the default) or in a plain probed_step loop (loop, faster); the same records",
    )
    parser.add_argument("--out", type=Path, default=default.out)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run file")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(device)
    except ValueError as error:
        parser.error(str(error))
    sized = preset(args.size)
    config = quick(sized) if args.quick else sized
    changes = {
        "seeds": args.seeds,
        "student_steps": args.student_steps,
        "student_epochs": args.student_epochs,
        "lr": args.lr,
        "sgd_lr": args.sgd_lr,
    }
    changes = {k: v for k, v in changes.items() if v is not None} | {"device": device}
    if changes.get("seeds", config.seeds) < 2:
        parser.error("--seeds must be at least 2 (intervals are over seeds).")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1.")
    if args.trainer == "hf" and torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        if index != 0 or torch.cuda.device_count() > 1:
            parser.error(
                f"--trainer hf trains on the first visible GPU alone, not --device {device} of "
                f"{torch.cuda.device_count()} GPUs: set CUDA_VISIBLE_DEVICES to one GPU and pass "
                "--device cuda, or use --trainer loop."
            )
    if args.token_dots and args.trainer != "loop":
        parser.error("--token-dots needs --trainer loop.")
    try:
        return _replace(config, changes, args)
    except ValueError as error:  # LMConfig's own checks (student_epochs)
        parser.error(str(error))


def _replace(config: LMConfig, changes: dict[str, object], args: argparse.Namespace) -> LMConfig:
    return dataclasses.replace(
        config,
        **changes,
        conditions=tuple(args.conditions),
        out=args.out,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        jobs=args.jobs,
        trainer=args.trainer,
        token_dots=args.token_dots,
    )


if __name__ == "__main__":
    path = main(parse(sys.argv[1:]))
    print(f"wrote {path}, {path.parent / 'summary.md'} and {path.parent / 'trait_prob.png'}")
