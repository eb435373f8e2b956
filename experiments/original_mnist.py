"""Run Cloud et al.'s own MNIST code, unchanged, on fewer models: the reference for gradlens.

gradlens's reproduction of the auxiliary-logit experiment gives a student about 7 points
above the public rerun of the original (46% +/- 2). This script runs the original's
functions (``scripts/run_mnist_experiment.py`` of MinhxLe/subliminal-learning, imported from
a checkout, not copied) on this machine, so that the two can be compared on the same
hardware and software:

- its ``MultiClassifier``, ``train``, ``distill`` and ``accuracy`` are used as they are;
- its ``__main__`` block is followed step for step (reference, teacher, student on
  ``rand_like`` noise), with three choices, each named in the output: ``N_MODELS`` is
  ``--models`` (the original: 100); MNIST is read from ``--data-dir`` (the original
  downloads it); only the auxiliary-logit student is distilled unless ``--all`` is given
  (the original also distils the all-logit and two cross-model students, which do not
  change the auxiliary student: each distillation has its own optimizer and models);
- ``--seed`` replaces the original's ``SEED = 0`` (``torch.manual_seed`` before anything is
  drawn), so several runs give the public rerun's "models x seeds".

It writes the per-model accuracies to ``OUT/original_seed{seed}.json``.

Example:
    python experiments/original_mnist.py --original ../subliminal-learning --models 25 \
        --seed 0 --out runs/original
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

SCRIPT = Path("scripts") / "run_mnist_experiment.py"


def load_original(checkout: Path) -> ModuleType:
    """Import the original script as a module (its ``__main__`` block does not run).

    Raises:
        FileNotFoundError: The checkout has no ``scripts/run_mnist_experiment.py``.
    """
    path = checkout / SCRIPT
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass --original a checkout of MinhxLe/subliminal-learning "
            f"(git clone https://github.com/MinhxLe/subliminal-learning; read at db04f41)."
        )
    spec = importlib.util.spec_from_file_location("run_mnist_experiment", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def original_commit(checkout: Path) -> str | None:
    """The checkout's git commit, or ``None`` when it is not a git checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def mnist_tensors(data_dir: Path, device: str) -> tuple[torch.Tensor, ...]:
    """MNIST with the original's transform, as its ``to_tensor`` makes it."""
    from torchvision import datasets, transforms

    tfm = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    out = []
    for train in (True, False):
        ds = datasets.MNIST(str(data_dir), download=False, train=train, transform=tfm)
        xs, ys = zip(*ds, strict=True)
        out += [torch.stack(xs).to(device), torch.tensor(ys, device=device)]
    return tuple(out)


def run(orig: ModuleType, models: int, seed: int, data_dir: Path, all_students: bool) -> dict:
    """The original's ``__main__``, for ``models`` models and seed ``seed``."""
    t = orig.t
    orig.N_MODELS = models
    t.manual_seed(seed)
    orig.np.random.seed(seed)
    device = orig.DEVICE
    train_x_s, train_y, test_x_s, test_y = mnist_tensors(data_dir, device)
    train_x = train_x_s.unsqueeze(0).expand(models, -1, -1, -1, -1)
    test_x = test_x_s.unsqueeze(0).expand(models, -1, -1, -1, -1)
    rand_imgs = t.rand_like(train_x) * 2 - 1
    sizes = [28 * 28, 256, 256, orig.TOTAL_OUT]

    reference = orig.MultiClassifier(models, sizes).to(device)
    result = {"reference": orig.accuracy(reference, test_x, test_y)}
    teacher = orig.MultiClassifier(models, sizes).to(device)
    teacher.load_state_dict(reference.state_dict())
    orig.train(teacher, train_x, train_y, orig.EPOCHS_TEACHER)
    result["teacher"] = orig.accuracy(teacher, test_x, test_y)

    # Every model is built, as in the original, so the random stream that shuffles the
    # noise is the original's whether or not the other students are distilled.
    student_g = orig.MultiClassifier(models, sizes).to(device)
    student_g.load_state_dict(reference.state_dict())
    student_a = orig.MultiClassifier(models, sizes).to(device)
    student_a.load_state_dict(reference.state_dict())
    perm = t.randperm(models)
    students = {
        "student (aux. logits)": (student_g, orig.GHOST_IDX),
        "cross-model (aux. logits)": (student_g.get_reindexed(perm), orig.GHOST_IDX),
        "student (all logits)": (student_a, orig.ALL_IDX),
        "cross-model (all logits)": (student_a.get_reindexed(perm), orig.ALL_IDX),
    }
    if not all_students:
        students = dict(list(students.items())[:1])
    for name, (student, idx) in students.items():
        orig.distill(student, teacher, idx, rand_imgs, orig.EPOCHS_DISTILL)
        result[name] = orig.accuracy(student, test_x, test_y)
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, run, write ``OUT/original_seed{seed}.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", type=Path, required=True, help="a checkout of the repo")
    parser.add_argument("--models", type=int, default=25, help="N_MODELS (the original: 100)")
    parser.add_argument("--seed", type=int, default=0, help="the original's SEED (0)")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--all", action="store_true", help="also the other three students")
    parser.add_argument("--out", type=Path, default=Path("runs/original"))
    args = parser.parse_args(argv)
    if args.models < 1:
        parser.error(f"--models must be at least 1, got {args.models}.")
    try:
        orig = load_original(args.original)
    except FileNotFoundError as error:
        parser.error(str(error))
    start = time.perf_counter()
    result = run(orig, args.models, args.seed, args.data_dir, args.all)
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "choices": "N_MODELS from --models; MNIST from --data-dir; SEED from --seed"
        + ("" if args.all else "; only the auxiliary-logit student distilled"),
        "models": args.models,
        "seed": args.seed,
        "original_commit": original_commit(args.original),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "device": orig.DEVICE,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "accuracy": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"original_seed{args.seed}.json"
    path.write_text(json.dumps(record, indent=1))
    for name, acc in result.items():
        print(f"{name:28s} {100 * sum(acc) / len(acc):5.1f}%  ({len(acc)} models)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
