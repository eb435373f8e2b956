"""Mutation run of the core statistics: every plausible wrong version must fail a test.

Each :class:`Mutant` is one text replacement in the source of the core
statistics (``gradops``, ``layerstats``, ``alignment`` and the aligned
projection). For each, this script copies the repository's ``gradlens/``,
``tests/``, ``conftest.py`` and ``pyproject.toml`` to a temporary folder,
applies the replacement there, and runs the core test files against that copy
with ``pytest -x``. A mutant is *killed* when a test fails (or the run times
out) and *survives* when every test passes. Before the mutants, the unmutated
copy must pass and must be the ``gradlens`` that the tests import.

Run from the repository root::

    python tests/mutation/run.py            # every mutant, one per core at a time
    python tests/mutation/run.py --list     # the mutants, without running them
    python tests/mutation/run.py --only cosine_one sum_groups_transposed

It exits 1 if any mutant survives, if a mutant's ``old`` text is not found
exactly once, or if the unmutated copy fails. ``tests/mutation/test_mutants.py``
(part of the normal suite) checks the last of these cheaply, so renaming code
that a mutant names fails a test instead of skipping the mutant.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CORE_TESTS = (
    "tests/alignment/test_gradops.py",
    "tests/alignment/test_layerstats.py",
    "tests/alignment/test_measures.py",
    "tests/transforms/test_aligned_values.py",
    "tests/transforms/test_aligned.py",
    "tests/transforms/test_record_properties.py",
    "tests/transforms/test_properties.py",
)
"""The test files a mutant must fail, in the order ``pytest -x`` runs them."""

COPIED = ("gradlens", "tests", "conftest.py", "pyproject.toml")
"""What the temporary copy holds: the package, the tests and their settings."""

NO_SHRINK = """

# Appended by tests/mutation/run.py to its temporary copy only: the first failing example
# kills a mutant, so hypothesis need not shrink it (shrinking is most of a killed run's time).
from hypothesis import Phase

settings.register_profile(
    "mutation", parent=settings.default, phases=(Phase.explicit, Phase.reuse, Phase.generate)
)
settings.load_profile("mutation")
"""

GRADOPS = "gradlens/alignment/gradops.py"
LAYERSTATS = "gradlens/alignment/layerstats.py"
ALIGNMENT = "gradlens/alignment/measures.py"
ALIGNED = "gradlens/transforms/aligned.py"
GROUPS = "gradlens/transforms/_groups.py"


@dataclass(frozen=True)
class Mutant:
    """One plausible mistake: replace ``old`` (found exactly once in ``path``) by ``new``.

    Attributes:
        id: A short name, for ``--only`` and the report.
        path: The source file, relative to the repository root.
        old: Text that occurs exactly once in that file.
        new: What replaces it.
        why: The mistake it stands for.
    """

    id: str
    path: str
    old: str
    new: str
    why: str


MUTANTS: tuple[Mutant, ...] = (
    # gradlens.alignment.gradops
    Mutant(
        "cosine_one",
        GRADOPS,
        "return safe_divide(dot(a, b), norm(a) * norm(b))",
        "return torch.ones_like(dot(a, b))",
        "a constant cosine (bounded and symmetric, so property tests alone pass it)",
    ),
    Mutant(
        "cosine_sign",
        GRADOPS,
        "return safe_divide(dot(a, b), norm(a) * norm(b))",
        "return -safe_divide(dot(a, b), norm(a) * norm(b))",
        "the cosine's sign flipped (still bounded, symmetric and 1 on a == a up to sign)",
    ),
    Mutant(
        "cosine_sq_norms",
        GRADOPS,
        "return safe_divide(dot(a, b), norm(a) * norm(b))",
        "return safe_divide(dot(a, b), sq_norm(a) * sq_norm(b))",
        "the cosine divided by the squared norms",
    ),
    Mutant(
        "dot_first_param",
        GRADOPS,
        "for n in a]).sum()",
        "for n in list(a)[:1]]).sum()",
        "the dot product over the first parameter only",
    ),
    Mutant(
        "sq_norm_no_square",
        GRADOPS,
        "return torch.stack(torch._foreach_norm(list(a.values()))).square().sum()",
        "return torch.stack(torch._foreach_norm(list(a.values()))).sum()",
        "the squared norm as a sum of per-parameter norms",
    ),
    Mutant(
        "norm_no_sqrt",
        GRADOPS,
        "return sq_norm(a).sqrt()",
        "return sq_norm(a)",
        "the norm without its square root",
    ),
    Mutant(
        "safe_divide_unguarded",
        GRADOPS,
        "return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)",
        "return num / den",
        "no zero guard: 0 / 0 is NaN for a zero gradient",
    ),
    Mutant(
        "safe_divide_zero_is_one",
        GRADOPS,
        "return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)",
        "return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 1.0)",
        "a zero denominator gives 1, not 0",
    ),
    Mutant(
        "projection_coef_norm",
        GRADOPS,
        "return safe_divide(dot(g, reference), sq_norm(reference))",
        "return safe_divide(dot(g, reference), norm(reference))",
        "the projection coefficient over ||r|| instead of ||r||^2",
    ),
    Mutant(
        "layer_of_first_dot",
        GRADOPS,
        'return name.rpartition(".")[0] or name',
        'return name.partition(".")[0] or name',
        'layers cut at the first dot: "net.0.weight" and "net.2.weight" share layer "net"',
    ),
    Mutant(
        "group_by_layer_one_group",
        GRADOPS,
        "groups.setdefault(layer_of(name), []).append(name)",
        'groups.setdefault("all", []).append(name)',
        "every parameter in one layer",
    ),
    # gradlens.alignment.layerstats
    Mutant(
        "groups_for_ignores_scope",
        LAYERSTATS,
        'return {GLOBAL: list(names)} if scope == "global" else group_by_layer(names)',
        "return {GLOBAL: list(names)}",
        'scope="layer" measured as one group',
    ),
    Mutant(
        "sum_groups_transposed",
        LAYERSTATS,
        "return values.reshape(len(sizes), sizes[0], *values.shape[1:]).sum(dim=1)",
        "return values.reshape(sizes[0], len(sizes), *values.shape[1:]).sum(dim=0)",
        "equal-sized groups summed across instead of within (a strided reshape)",
    ),
    Mutant(
        "sum_groups_split_one",
        LAYERSTATS,
        "return torch.stack([part.sum(dim=0) for part in values.split(list(sizes))])",
        "return torch.stack([part.sum(dim=0) for part in values.split(max(sizes))])",
        "unequal groups split into runs of the largest size",
    ),
    Mutant(
        "layer_stats_dot_with_self",
        LAYERSTATS,
        "[torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g, r, strict=True)]",
        "[torch.vdot(a.reshape(-1), a.reshape(-1)) for a, b in zip(g, r, strict=True)]",
        "the per-layer dot of g with itself",
    ),
    Mutant(
        "layer_coef_norm",
        LAYERSTATS,
        "return safe_divide(self.dot, self.ref_sq_norm)",
        "return safe_divide(self.dot, self.ref_sq_norm.sqrt())",
        "the per-layer coefficient over ||r|| instead of ||r||^2",
    ),
    Mutant(
        "layer_cosine_no_sqrt",
        LAYERSTATS,
        "return safe_divide(self.dot, (self.sq_norm * self.ref_sq_norm).sqrt())",
        "return safe_divide(self.dot, self.sq_norm * self.ref_sq_norm)",
        "the per-layer cosine over the product of squared norms",
    ),
    Mutant(
        "layer_norm_no_sqrt",
        LAYERSTATS,
        "return self.sq_norm.sqrt()",
        "return self.sq_norm",
        "the per-layer norm without its square root",
    ),
    Mutant(
        "total_mean_dot",
        LAYERSTATS,
        "self.dot.sum(dim=0, keepdim=True),",
        "self.dot.mean(dim=0, keepdim=True),",
        "the global dot as the mean of the layers' dots",
    ),
    Mutant(
        "total_ref_max",
        LAYERSTATS,
        "self.ref_sq_norm.sum(dim=0, keepdim=True),",
        "self.ref_sq_norm.amax(dim=0, keepdim=True),",
        "the global ||r||^2 as the largest layer's",
    ),
    Mutant(
        "ref_sq_norm_ignored",
        LAYERSTATS,
        "if ref_sq_norm is None:\n        ref_sq_norm = sum_groups(_sq_norms(r), sizes)",
        "ref_sq_norm = sum_groups(_sq_norms(g), sizes)",
        "||r||^2 taken from the gradient instead of the reference",
    ),
    # gradlens.alignment.measures
    Mutant(
        "alignment_projection_is_cosine",
        ALIGNMENT,
        "projection=total.coef[0],",
        "projection=total.cosine[0],",
        "the global projection reported as the cosine",
    ),
    Mutant(
        "alignment_norms_swapped",
        ALIGNMENT,
        "norm=total.norm[0],\n        reference_norm=total.ref_norm[0],",
        "norm=total.ref_norm[0],\n        reference_norm=total.norm[0],",
        "the gradient's and the reference's norms swapped",
    ),
    Mutant(
        "alignment_layer_projection",
        ALIGNMENT,
        "layer_projection=layers.coef,",
        "layer_projection=layers.coef.sum() * torch.ones_like(layers.coef),",
        "every layer given the sum of the layers' coefficients",
    ),
    Mutant(
        "example_cosine_no_reference_norm",
        ALIGNMENT,
        "cosine=safe_divide(dot, (sq * ref_sq.sum()).sqrt()),",
        "cosine=safe_divide(dot, sq.sqrt()),",
        "the per-example cosine missing the reference norm",
    ),
    Mutant(
        "example_cosine_layer_sum",
        ALIGNMENT,
        "cosine=safe_divide(dot, (sq * ref_sq.sum()).sqrt()),",
        "cosine=safe_divide(layer_dot, (layer_sq * ref_sq).sqrt()).sum(dim=1),",
        "the per-example cosine as the sum of the layer cosines",
    ),
    Mutant(
        "example_layer_cosine_no_reference_norm",
        ALIGNMENT,
        "layer_cosine=safe_divide(layer_dot, (layer_sq * ref_sq).sqrt()),",
        "layer_cosine=safe_divide(layer_dot, layer_sq.sqrt()),",
        "the per-example layer cosine missing the reference norm",
    ),
    Mutant(
        "example_norm_squared",
        ALIGNMENT,
        "norm=sq.sqrt(),",
        "norm=sq,",
        "the per-example norm without its square root",
    ),
    Mutant(
        "summarize_ge_zero",
        ALIGNMENT,
        '"frac_positive": (values > 0).float().mean(dim=-1),',
        '"frac_positive": (values >= 0).float().mean(dim=-1),',
        "zero-gradient examples (cosine exactly 0) counted as positive",
    ),
    Mutant(
        "summarize_median",
        ALIGNMENT,
        '"mean": values.mean(dim=-1),',
        '"mean": values.median(dim=-1).values,',
        "the mean reported as the median",
    ),
    Mutant(
        "quantile_levels_shifted",
        ALIGNMENT,
        "QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)",
        "QUANTILES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)",
        "the published quantile levels shifted",
    ),
    Mutant(
        "quantile_nearest",
        ALIGNMENT,
        "torch.quantile(values, levels, dim=-1)",
        'torch.quantile(values, levels, dim=-1, interpolation="lower")',
        "quantiles without linear interpolation",
    ),
    # gradlens.transforms.aligned and its helpers
    Mutant(
        "scale_aligned_coef_sign",
        ALIGNED,
        "(1 - alpha) * (acted * coef)",
        "(1 - alpha) * (acted * -coef)",
        "the projection subtracted with the coefficient's sign flipped",
    ),
    Mutant(
        "scale_aligned_one_plus_alpha",
        ALIGNED,
        "(1 - alpha) * (acted * coef)",
        "(1 + alpha) * (acted * coef)",
        "the aligned component scaled by the wrong factor",
    ),
    Mutant(
        "scale_aligned_only_positive_ge",
        ALIGNED,
        "acted = acted & (coef > 0)",
        "acted = acted & (coef >= 0)",
        "only_positive also acting where the coefficient is exactly 0",
    ),
    Mutant(
        "scale_aligned_acts_on_zero_reference",
        ALIGNED,
        "acted = onto.ref_sq_norm > 0",
        "acted = onto.ref_sq_norm >= 0",
        "a zero reference recorded as acted on",
    ),
    Mutant(
        "scale_aligned_cosine_after_is_before",
        ALIGNED,
        "cosine_after=to_scope(cosine_after(after, before), scope),",
        "cosine_after=to_scope(before.cosine, scope),",
        "the recorded cosine after the transform is the one before it",
    ),
    Mutant(
        "subtract_along_adds",
        GROUPS,
        "grads[name] - (amount[index[name]] * reference[name])",
        "grads[name] + (amount[index[name]] * reference[name])",
        "the aligned component added instead of subtracted",
    ),
    Mutant(
        "subtract_along_first_group",
        GROUPS,
        "grads[name] - (amount[index[name]] * reference[name])",
        "grads[name] - (amount[0] * reference[name])",
        "every layer given the first layer's coefficient",
    ),
    Mutant(
        "cosine_after_unguarded",
        GROUPS,
        "return torch.where(resolved, after.cosine, 0.0)",
        "return after.cosine",
        "rounding noise of a removed parallel gradient reported as its cosine",
    ),
)


def mutate(source: str, mutant: Mutant) -> str:
    """Return ``source`` with ``mutant.old`` replaced by ``mutant.new``.

    Raises:
        ValueError: Unless ``mutant.old`` occurs exactly once.
    """
    count = source.count(mutant.old)
    if count != 1:
        raise ValueError(
            f"mutant {mutant.id!r}: its old text occurs {count} times in {mutant.path}, not "
            "once; update the mutant to the refactored source (tests/mutation/run.py)."
        )
    return source.replace(mutant.old, mutant.new)


def check_mutants(root: Path = ROOT) -> list[str]:
    """Return one message per mutant that does not apply cleanly to the source under ``root``."""
    problems = []
    ids = [m.id for m in MUTANTS]
    problems += [f"duplicate mutant id {i!r}" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for mutant in MUTANTS:
        path = root / mutant.path
        if not path.is_file():
            problems.append(f"mutant {mutant.id!r}: {mutant.path} does not exist")
            continue
        if mutant.old == mutant.new:
            problems.append(f"mutant {mutant.id!r}: old and new are the same")
            continue
        try:
            mutate(path.read_text(), mutant)
        except ValueError as error:
            problems.append(str(error))
    return problems


@dataclass(frozen=True)
class Outcome:
    """How one run of the tests ended."""

    id: str
    passed: bool
    seconds: float
    detail: str


def _copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", "*.pyc")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)
    with (dest / "tests" / "conftest.py").open("a") as conftest:
        conftest.write(NO_SHRINK)


def _first_failure(output: str) -> str:
    found = re.search(r"^(FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    if found:
        return f"{found.group(1).lower()} {found.group(2)}"
    return output.strip().splitlines()[-1] if output.strip() else "no output"


def run_tests(mutant: Mutant | None, scratch: Path, timeout: float) -> Outcome:
    """Copy the repository into ``scratch``, apply ``mutant`` (or none), run the core tests."""
    name = mutant.id if mutant else "baseline"
    work = scratch / name
    work.mkdir()
    _copy(work)
    if mutant is not None:
        path = work / mutant.path
        path.write_text(mutate(path.read_text(), mutant))
    # One thread per run: the runs go in parallel, one per core.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *CORE_TESTS]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Outcome(name, False, time.perf_counter() - start, f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    detail = "all passed" if done.returncode == 0 else _first_failure(output)
    return Outcome(name, done.returncode == 0, seconds, detail)


def _imports_the_copy(scratch: Path) -> bool:
    """Whether ``python -m pytest`` run in the baseline copy imports that copy's ``gradlens``."""
    work = scratch / "baseline"
    code = "import gradlens, pathlib; print(pathlib.Path(gradlens.__file__).resolve())"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip()).is_relative_to(work.resolve())


def main(argv: list[str] | None = None) -> int:
    """Run the mutants and print a table; return 0 only when every one is killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="mutants run at once (default: cores)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    args = parser.parse_args(argv)

    problems = check_mutants()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    mutants = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in MUTANTS})
        if unknown:
            print(f"unknown mutant ids: {unknown}", file=sys.stderr)
            return 1
        mutants = [m for m in MUTANTS if m.id in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.id:40s} {m.path:32s} {m.why}")
        return 0

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradlens-mutation-") as tmp:
        scratch = Path(tmp)
        baseline = run_tests(None, scratch, args.timeout)
        if not baseline.passed:
            print(f"the unmutated copy fails: {baseline.detail}", file=sys.stderr)
            return 1
        if not _imports_the_copy(scratch):
            print("the tests import another gradlens than the copy", file=sys.stderr)
            return 1
        print(f"baseline: {len(CORE_TESTS)} test files pass in {baseline.seconds:.1f} s")
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(lambda m: run_tests(m, scratch, args.timeout), mutants))
    survived = [o for o in outcomes if o.passed]
    for mutant, outcome in zip(mutants, outcomes, strict=True):
        verdict = "SURVIVED" if outcome.passed else "killed"
        print(f"{verdict:8s} {mutant.id:40s} {outcome.seconds:5.1f} s  {outcome.detail}")
    elapsed = time.perf_counter() - start
    print(
        f"{len(outcomes) - len(survived)} killed, {len(survived)} survived, "
        f"of {len(outcomes)} mutants in {elapsed:.0f} s"
    )
    for outcome in survived:
        mutant = next(m for m in mutants if m.id == outcome.id)
        print(f"survivor {mutant.id}: {mutant.why} ({mutant.path})", file=sys.stderr)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
