"""Record properties of ``_asserts`` over every transform of ``_cases.CASES``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from . import _asserts
from ._cases import CASES, Case, Problem, problems


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
@given(problem=problems())
@settings(max_examples=10)
def test_records_incoming_coef_and_cosine(case: Case, problem: Problem) -> None:
    _asserts.assert_records_incoming_coef_and_cosine(case, problem)
