"""The API reference names every public name."""

from pathlib import Path

import gradlens

API = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


def test_every_public_name_is_in_the_api_reference() -> None:
    missing = [n for n in gradlens.__all__ if n != "__version__" and f"`{n}" not in API]
    assert not missing, f"document these in docs/api.md: {missing}"
