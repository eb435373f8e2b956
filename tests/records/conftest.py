"""The record tests start and end with a garbage collection.

These tests interrupt netCDF writes on purpose. In the full suite, a cyclic
garbage collection that happened to run inside one of them once released
netCDF4 handles left by earlier tests, and netCDF4's ``Dataset.__dealloc__``
raised there (an unraisable ``AttributeError: __getattribute__``, which pytest
turns into a failure of whichever test is running). Collecting at each test's
boundaries makes the collection points the same in every run, so a handle a
test leaks is reported against that test.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_at_the_boundaries() -> Iterator[None]:
    gc.collect()
    yield
    gc.collect()
