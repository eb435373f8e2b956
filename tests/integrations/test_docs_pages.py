"""Every code block of docs/integrations/*.md runs (in a scratch folder: they write runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "integrations"


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # sdpa, kl_div: vmap
@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")  # GKDTrainer
@pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers")
@pytest.mark.parametrize("page", ["transformers.md", "lightning.md"])
def test_the_page_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("trl" if page == "transformers.md" else "lightning")
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)
    assert blocks
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": f"docs_{page[:-3]}"}
    for block in blocks:  # later blocks of a page use the names of earlier ones
        exec(compile(block, f"docs/integrations/{page}", "exec"), scope)
    assert list(tmp_path.glob("*_run.nc"))
