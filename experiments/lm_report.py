"""Write the LM experiment's summary and figures from a run file (combined or compact).

    python experiments/lm_report.py docs/results/lm_subliminal/lm_subliminal_compact.nc

writes ``summary.md`` and the PNGs of ``subliminal_lm.FIGURES`` beside the file (or in ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import xarray as xr

from gradlens.records.atomic import atomic_write_text
from subliminal_lm import save_figures, summary_markdown


def report(path: Path, out: Path | None = None) -> list[Path]:
    """Write ``summary.md`` and the figures of the run file ``path`` into ``out``."""
    out = path.parent if out is None else out
    ds = xr.load_dataset(path)
    written = [atomic_write_text(out / "summary.md", summary_markdown(ds))]
    return written + save_figures(ds, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="lm_subliminal.nc or lm_subliminal_compact.nc")
    parser.add_argument("--out", type=Path, help="folder to write in (default: the file's)")
    args = parser.parse_args(sys.argv[1:])
    for p in report(args.path, args.out):
        print(f"wrote {p}")
