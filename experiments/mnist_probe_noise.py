r"""How the trait probe's size moves the measured alignment, and what it costs (MNIST, step 0).

The trait gradient ``g_t`` is estimated on a probe batch of ``m`` labelled
images; a smaller probe is cheaper and noisier. For each of ``--models``
teacher/student pairs of the experiment (the student at its shared
initialisation, the teacher trained from it as in ``mnist_aux.py``), this
draws ``--draws`` probe batches of each size from the 60,000 training images
and records, per draw:

- ``cosine``: cos(g_t(m), g_d), the alignment a probed step measures, with
  g_d the distillation gradient on one noise batch of 1,024 images (KL on the
  auxiliary logits, the experiment's loss);
- ``full_cosine``: cos(g_t(m), g_t(60,000)), how close the estimate is to the
  trait gradient of the whole training set;
- ``seconds``: the process CPU time of the probe's forward and backward, and,
  once per model and state, that of g_d's (``distill_seconds``), the
  backward a step takes anyway.

The student is measured twice (``student_step``, :data:`STATES`): at its
initialisation and after 100 distillation steps.

Example (docs/benchmarks.md, "The trait probe's size")::

    OMP_NUM_THREADS=1 python experiments/mnist_probe_noise.py --out docs/results/probe_noise
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

from gradlens.stats import mean_ci
from subliminal_mnist import init_mlp, load_mnist, noise_batch, train_classifier
from subliminal_mnist.losses import example_cross_entropy, example_kl

SIZES = (16, 64, 256, 1024, 4096, 16384)
STATES = (0, 100)
"""The student's distillation steps before it is measured: its initialisation, and 100 Adam
steps (lr 3e-4, batch 1,024, fresh noise) into the auxiliary-logit distillation."""
MLP = (784, 256, 256, 13)


def _grad(model: nn.Module, loss: Callable[..., Tensor], *args: Tensor) -> tuple[Tensor, float]:
    """The flat gradient of ``loss(model(args[0]), *args[1:])`` and the CPU seconds it took."""
    start = time.process_time()
    value = loss(model(args[0]), *args[1:])
    grads = torch.autograd.grad(value, list(model.parameters()))
    flat = torch.cat([g.reshape(-1) for g in grads])
    return flat, time.process_time() - start


def _distill(out: Tensor, targets: Tensor) -> Tensor:
    """The experiment's distillation loss: KL on the auxiliary logits, mean over examples."""
    return example_kl(out[:, 10:], targets).mean()


def _trait_sum(out: Tensor, labels: Tensor) -> Tensor:
    """The trait loss summed over examples (cross-entropy of the class logits)."""
    return example_cross_entropy(out[:, :10], labels).sum()


def _cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def measure(models: int, draws: int, data_dir: str | None, progress: bool) -> xr.Dataset:
    """Per model, probe size and draw: ``cosine``, ``full_cosine`` and ``seconds``."""
    train = load_mnist(data_dir)
    images, labels = train.images, train.labels
    n = len(labels)
    shape = (models, len(STATES), len(SIZES), draws)
    cosine, full_cosine, seconds = (
        np.full(shape, np.nan),
        np.full(shape, np.nan),
        np.full(shape, np.nan),
    )
    distill_seconds = np.full((models, len(STATES)), np.nan)
    for k in tqdm(range(models), desc="models", disable=not progress):
        student = init_mlp(MLP, seed=k)
        teacher = init_mlp(MLP, seed=k)  # the shared initialisation
        train_classifier(teacher, train, epochs=5, batch_size=1024, lr=3e-4, seed=k, progress=False)
        optimizer = torch.optim.Adam(student.parameters(), lr=3e-4)
        done = 0
        for i, state in enumerate(STATES):
            for step in range(done, state):  # distil up to this state
                noise = noise_batch(k, 1, step, 1024)
                with torch.no_grad():
                    targets = teacher(noise)[:, 10:]
                optimizer.zero_grad()
                _distill(student(noise), targets).backward()
                optimizer.step()
            done = state
            noise = noise_batch(k, 0, 0, 1024)
            with torch.no_grad():
                targets = teacher(noise)[:, 10:]
            g_d, distill_seconds[k, i] = _grad(student, _distill, noise, targets)
            chunks = [slice(a, min(a + 8192, n)) for a in range(0, n, 8192)]
            g_full = sum(_grad(student, _trait_sum, images[c], labels[c])[0] for c in chunks) / n
            gen = torch.Generator().manual_seed(1000 + k)
            for j, m in enumerate(SIZES):
                for r in range(draws):
                    idx = torch.randperm(n, generator=gen)[:m]
                    g_t, seconds[k, i, j, r] = _grad(student, _trait_sum, images[idx], labels[idx])
                    cosine[k, i, j, r] = _cos(g_t, g_d)  # a sum's gradient points as a mean's
                    full_cosine[k, i, j, r] = _cos(g_t, g_full)
    dims = ("model", "student_step", "probe_size", "draw")
    return xr.Dataset(
        {
            "cosine": (dims, cosine, {"long_name": "cos(g_t(m), g_d)"}),
            "full_cosine": (dims, full_cosine, {"long_name": "cos(g_t(m), g_t(60,000))"}),
            "seconds": (dims, seconds, {"units": "s", "long_name": "probe gradient, CPU time"}),
            "distill_seconds": (("model", "student_step"), distill_seconds, {"units": "s"}),
        },
        coords={"probe_size": list(SIZES), "student_step": list(STATES)},
        attrs={"torch": torch.__version__, "threads": torch.get_num_threads()},
    )


def summary(ds: xr.Dataset) -> str:
    """The table: per student state and probe size, over models and across draws."""
    lines = [
        "| student step | probe size | mean cos(g_t(m), g_d) | sd over draws "
        "| mean cos(g_t(m), g_t(60,000)) | probe gradient / distillation gradient (CPU time) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ratio = ds["seconds"].median("draw") / ds["distill_seconds"]
    for state in ds.student_step.values:
        for m in ds.probe_size.values:
            sel = ds.sel(student_step=state, probe_size=m)
            cos = mean_ci(sel["cosine"].mean("draw"), dim="model")
            spread = float(sel["cosine"].std("draw", ddof=1).mean("model"))
            full = mean_ci(sel["full_cosine"].mean("draw"), dim="model")
            cost = mean_ci(ratio.sel(student_step=state, probe_size=m), dim="model")
            lines.append(
                f"| {int(state)} | {int(m)} | {float(cos['mean']):.4f} ± "
                f"{float(cos['half_width']):.4f} | {spread:.4f} | {float(full['mean']):.3f} ± "
                f"{float(full['half_width']):.3f} | {float(cost['mean']):.2f}x ± "
                f"{float(cost['half_width']):.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(ds: xr.Dataset) -> Figure:
    """Against the probe size: cos(g_t(m), g_d), its sd over draws, cos(g_t(m), g_t(60,000))."""
    fig = Figure(figsize=(14, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    m = ds.probe_size.values
    for state in ds.student_step.values:
        sel = ds.sel(student_step=state)
        label = f"student step {int(state)}"
        for ax, values in zip(
            axes,
            (
                sel["cosine"].mean("draw"),
                sel["cosine"].std("draw", ddof=1),
                sel["full_cosine"].mean("draw"),
            ),
            strict=True,
        ):
            ci = mean_ci(values, dim="model")
            ax.fill_between(m, ci["lower"], ci["upper"], alpha=0.25)
            ax.plot(m, ci["mean"], "o-", label=label)
    labels = ("cos(g_t(m), g_d), mean over draws", "its sd over draws", "cos(g_t(m), g_t(60,000))")
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("probe size m (labelled images)")
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    axes[1].set_yscale("log")
    n = ds.sizes["model"]
    fig.suptitle(f"the trait probe's size (mean and 95% CI over {n} models)")
    return fig


def main(argv: list[str] | None = None) -> None:
    """Measure, then write probe_noise.nc, summary.md and probe_noise.png into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", type=int, default=5, help="teacher/student pairs (5)")
    parser.add_argument("--draws", type=int, default=20, help="probe batches per size (20)")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw (else $GRADLENS_DATA_DIR)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.models < 2 or args.draws < 2:
        parser.error("--models and --draws must be at least 2 (intervals and spreads need two)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ds = measure(args.models, args.draws, args.data_dir, not args.no_progress)
    command = "python experiments/mnist_probe_noise.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    ds.attrs["command"] = command
    ds.to_netcdf(args.out / "probe_noise.nc")
    minutes = (time.monotonic() - started) / 60
    (args.out / "summary.md").write_text(
        f"Command: `{command}` ({minutes:.1f} min)\n\n"
        f"{args.models} models (`init_mlp` seeds 0..{args.models - 1}: the teacher trained from "
        "the student's initialisation as in mnist_aux.py; the student at its initialisation and "
        f"after 100 distillation steps), {args.draws} probe batches per size, drawn from the "
        "60,000 training "
        "images. Means ± 95% t intervals over models of each model's mean over draws; the sd is "
        "across draws (the noise a single step's probe carries), averaged over models; the cost "
        "is the median over draws of the probe gradient's CPU time over the distillation "
        "gradient's (one noise batch of 1,024 images).\n\n" + summary(ds)
    )
    plot(ds).savefig(args.out / "probe_noise.png", dpi=120)
    print(summary(ds))


if __name__ == "__main__":
    main()
