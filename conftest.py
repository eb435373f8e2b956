"""Seed torch, numpy and ``random`` before every test and every doctest in the package."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed before each test, so no draw (in tests/ or in a docstring example) is unseeded."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
