"""Shared test settings: a fixed hypothesis profile, ``--runslow`` (the seed: ../conftest.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# derandomize: hypothesis draws the same examples on every run, so a failure
# in CI reproduces locally; the dev profile is smaller but just as fixed.
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=20, deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    deselected = [item for item in items if "slow" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "slow" not in item.keywords]
