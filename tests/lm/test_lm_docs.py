"""The Python blocks of docs/lm_experiment.md run, in order, in one namespace."""

import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "lm_experiment.md"


def test_the_lm_experiment_page_runs() -> None:
    torch.set_num_threads(1)
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict[str, object] = {"__name__": "docs_lm_experiment"}
    for block in blocks:  # in order, one namespace: a later block uses an earlier one's names
        exec(compile(block, str(PAGE), "exec"), namespace)
    hf, loop = namespace["hf"], namespace["student"]
    assert hf.trait_prob == pytest.approx(loop.trait_prob, rel=1e-5)  # type: ignore[attr-defined]
    adapters = namespace["adapters"]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)  # type: ignore[attr-defined]
