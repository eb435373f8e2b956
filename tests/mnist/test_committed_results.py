"""The committed results recompute: every table row in the docs comes from a committed file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import xarray as xr

from subliminal_mnist import summary_markdown

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "docs" / "results").glob("*/mnist_aux_compact.nc"))


def table_rows(text: str) -> list[str]:
    """The data rows of the markdown tables (not headers or separators)."""
    starts = ("| teacher", "| reference", "| student `", "| `")
    return [line for line in text.splitlines() if line.startswith(starts)]


@pytest.mark.parametrize("path", RESULTS, ids=[p.parent.name for p in RESULTS])
def test_the_summary_table_recomputes_from_the_committed_file(path: Path) -> None:
    ds = xr.load_dataset(path)
    rows = table_rows(summary_markdown(ds, wall_time_s=0.0, device="", command=""))
    assert len(rows) >= 3  # teacher, reference and at least one condition
    committed = (path.parent / "summary.md").read_text()
    for row in rows:
        assert row in committed, f"{path.parent.name}/summary.md lacks the recomputed row {row!r}"


SECTION = "## Results: many models at once"


def test_every_results_row_quoted_in_the_docs_is_in_a_committed_summary() -> None:
    """A row of a results table in docs/experiment.md's section on the stacked runs is one
    of the rows recomputed from a committed file."""
    recomputed = {
        row
        for path in RESULTS
        for row in table_rows(
            summary_markdown(xr.load_dataset(path), wall_time_s=0.0, device="", command="")
        )
    }
    assert RESULTS, "no committed compact results under docs/results/*/"
    for doc in (ROOT / "docs" / "experiment.md",):
        text = doc.read_text()
        assert SECTION in text, f"{doc.name} has no section {SECTION!r}"
        section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
        quoted = [r for r in table_rows(section) if r.startswith(("| student `", "| `"))]
        assert quoted, f"{doc.name} quotes no results row"
        for row in quoted:
            assert row in recomputed, f"{doc.name} quotes a row no committed file gives: {row!r}"


def test_every_sweep_row_quoted_in_the_docs_is_in_a_committed_sweep_summary() -> None:
    """A sweep row (one value of the swept setting) quoted in the results section is a row of
    a committed sweep's summary.md, which tests/mnist/test_sweep.py recomputes from its
    sweep.nc."""
    sweeps = sorted((ROOT / "docs" / "results").glob("*/sweep.nc"))
    assert sweeps, "no committed sweeps under docs/results/*/"
    committed = {
        line
        for path in sweeps
        for line in (path.parent / "summary.md").read_text().splitlines()
        if re.match(r"\| [0-9]", line)
    }
    section = (ROOT / "docs" / "experiment.md").read_text().split(SECTION, 1)[1]
    section = section.split("\n## ", 1)[0]
    quoted = [line for line in section.splitlines() if re.match(r"\| [0-9]", line)]
    assert quoted, "the results section quotes no sweep row"
    for row in quoted:
        assert row in committed, f"experiment.md quotes a sweep row no sweep gives: {row!r}"


NUMBER = re.compile(r"([+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?)")


def _agrees(value: float, quoted: str) -> bool:
    """``value`` rounds to ``quoted`` at the precision ``quoted`` is written with."""
    mantissa = quoted.split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    scale = 10.0 ** int(quoted.split("e")[1]) if "e" in quoted else 1.0
    return abs(value - float(quoted)) <= 0.5 * 10.0**-decimals * scale * (1 + 1e-9)


def test_the_numbers_snippet_in_the_results_section_gives_the_numbers_it_quotes() -> None:
    """Each expression of the section's numbers snippet that ends in a comment is evaluated;
    its mean (x100 for a percentage or points), and its ± half-width and p when quoted, agree
    with the comment at the precision the comment gives."""
    section = (ROOT / "docs" / "experiment.md").read_text().split(SECTION, 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[-1]
    namespace: dict[str, object] = {}
    checked = 0
    for line in block.splitlines():
        code, _, comment = line.partition("  #")
        if not comment.strip():
            exec(line, namespace)
            continue
        result = eval(code, namespace)
        interval = hasattr(result, "data_vars")  # mean_ci / paired_t give a Dataset
        mean = float(result["mean"]) if interval else float(result)
        scale = 100.0 if ("%" in comment or "points" in comment) else 1.0
        quoted = NUMBER.findall(comment.split("p =")[0])
        assert _agrees(mean * scale, quoted[0]), f"{code.strip()} gives {mean}, quoted {comment}"
        if "±" in comment:
            assert interval and _agrees(float(result["half_width"]) * scale, quoted[1]), comment
        if "p =" in comment:
            p_quoted = NUMBER.findall(comment.split("p =")[1])[0]
            assert interval and _agrees(float(result["p"]), p_quoted), comment
        checked += 1
    assert checked >= 5, "the snippet quotes fewer numbers than expected"


# Numbers the README quotes from outside this repository, with where they come from.
EXTERNAL = {
    "2.3": "barathvelmu/subliminal-learning mnist/results/baseline_5seed.json: student_aux std "
    "0.02304 (the standard deviation of its five seed means)",
}
DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d+(?:e[+-]?\d+)?)(%?)")
MINUS = "\u2212"  # the minus sign the docs write


def _snippet_comments() -> list[str]:
    section = (ROOT / "docs" / "experiment.md").read_text().split(SECTION, 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[-1]
    return [line.partition("  #")[2] for line in block.splitlines() if "  #" in line]


def _checked_numbers() -> list[float]:
    """Every number of a text that a test recomputes: the summary tables recomputed from the
    committed compact files, the committed sweep tables (recomputed by tests/mnist/test_sweep.py),
    the experiment.md snippet's comments (checked above), and the committed drive and dose
    tables (recomputed by tests/mnist/test_causal_results.py and test_dose.py)."""
    texts = [
        summary_markdown(xr.load_dataset(path), wall_time_s=0.0, device="", command="")
        for path in RESULTS
    ]
    texts += [
        (path.parent / "summary.md").read_text()
        for path in sorted((ROOT / "docs" / "results").glob("*/sweep.nc"))
    ]
    texts += _snippet_comments()
    # the paired tables of docs/causal.md, which tests/mnist/test_causal_results.py (drive*.md)
    # and tests/mnist/test_dose.py (dose.md) recompute from the files their commands name
    results = ROOT / "docs" / "results"
    texts += [p.read_text() for p in [*results.glob("*/drive*.md"), *results.glob("*/dose.md")]]
    return [float(m) for text in texts for m, _ in DECIMAL.findall(text)]


def test_every_number_in_the_readme_results_is_recomputed_from_a_committed_file() -> None:
    """Each decimal number in README's results section (table and text) agrees, at the
    precision it is written with, with a number this file's tests recompute from committed
    files (a percentage also as a fraction), or is listed in EXTERNAL with its source."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## What it finds", 1)[1].split("\n## ", 1)[0]
    pool = _checked_numbers()
    quoted = DECIMAL.findall(section)
    assert len(quoted) > 40, "the README results section quotes fewer numbers than expected"
    missing = []
    for number, percent in quoted:
        if number in EXTERNAL:
            continue
        scales = (1.0, 100.0) if percent else (1.0,)
        if not any(_agrees(abs(v) * k, number) for v in pool for k in scales):
            missing.append(number + percent)
    assert not missing, f"README quotes numbers no committed file gives: {missing}"


def test_the_interventions_summary_table_recomputes() -> None:
    """Each row of docs/interventions.md's table of the stacked runs: its cells are the cells
    of the recomputed summary row (25 or 10 models) and of the paired row for its condition."""
    runs = {
        n: summary_markdown(xr.load_dataset(path), wall_time_s=0.0, device="", command="")
        for n, path in (
            ("25", ROOT / "docs/results/stacked_m25/mnist_aux_compact.nc"),
            ("10", ROOT / "docs/results/stacked_m10_liminal_interventions/mnist_aux_compact.nc"),
        )
    }
    text = (ROOT / "docs" / "interventions.md").read_text()
    section = text.split("### The original's protocol, many models at once", 1)[1]
    rows = [r for r in section.split("\n###", 1)[0].splitlines() if r.startswith("| `")]
    assert len(rows) >= 9
    for row in rows:
        name, n, acc, diff, majority, update, distill = (
            c.strip().replace(MINUS, "-").replace("+", "") for c in row.strip("|").split("|")
        )
        summary = runs[n]
        own = next(r for r in summary.splitlines() if r.startswith(f"| student {name} |"))
        for cell in (acc, majority, update, distill):
            assert f"| {cell} |" in own.replace("| -0.0000", "| 0.0000"), (row, cell)
        if diff:
            paired = next(r for r in summary.splitlines() if r.startswith(f"| {name} |"))
            assert f"| {diff} |" in paired, (row, diff)


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", ["README.md", "docs/experiment.md", "docs/interventions.md"])
def test_the_results_links_and_anchors_exist(doc: str) -> None:
    """Every relative link of the results docs names a file or folder that exists, and every
    #anchor a heading of its target."""
    path = ROOT / doc
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{doc} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked.read_text()), f"{doc}: no heading for #{anchor}"


def test_every_results_folder_holds_the_data_its_tables_and_figures_come_from() -> None:
    """A folder under docs/results with a summary or figures also holds a data file."""
    for folder in sorted(p for p in (ROOT / "docs" / "results").iterdir() if p.is_dir()):
        files = [p for p in folder.rglob("*") if p.is_file()]
        shown = [p for p in files if p.suffix in (".md", ".png")]
        data = [p for p in files if p.suffix in (".nc", ".json")]
        assert not shown or data, f"{folder.name} has {shown[0].name} but no data file"
