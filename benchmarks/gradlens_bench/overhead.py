"""The files of the first DDP benchmark: ``overhead.json`` and its table ``overhead.md``.

Before the DDP step joined the registry (family ``"ddp"``), a separate script
timed it and wrote ``overhead.json``: the run's settings and provenance and,
per workload (``mlp``, now ``ddp_mlp``; ``transformer``, now
``ddp_transformer``), every block's seconds per step of each mode (``plain``,
``probed``, ``probed_lean``, ``probed_remove``), their medians in ms and the
ratios to ``plain``. The committed run under
``benchmarks/results/ddp-cpu-2proc/`` is quoted by the docs;
:func:`overhead_markdown` redraws its table exactly as that script wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["overhead_markdown"]


def overhead_markdown(results: Mapping[str, Any]) -> str:
    """The markdown table of the medians and ratios of an ``overhead.json``."""
    lines = [
        "| workload | P | tensors | batch per rank | trait batch | plain ms | probed ms "
        "| probed lean ms | probed + remove_aligned ms | probed / plain | probed lean / plain "
        "| probed + remove / plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, found in results["workloads"].items():
        m, r = found["median_ms"], found["ratio_to_plain"]
        lines.append(
            f"| {name} | {found['parameters']} | {found['tensors']} | {results['batch']} | 64 "
            f"| {m['plain']:.2f} | {m['probed']:.2f} | {m['probed_lean']:.2f} "
            f"| {m['probed_remove']:.2f} | {r['probed']:.2f} | {r['probed_lean']:.2f} "
            f"| {r['probed_remove']:.2f} |"
        )
    return "\n".join(lines) + "\n"
