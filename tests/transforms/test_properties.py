"""Every property of ``_asserts`` over every transform of ``_cases.CASES``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from . import _asserts
from ._cases import CASES, Case, Problem, problems

REMOVERS = [case for case in CASES if case.alpha == 0 and case.acts_on_mean]
REVERSERS = [case for case in CASES if case.alpha == -1 and case.acts_on_mean]
# The random-direction control changes the part orthogonal to the reference by design.
ALONG_REFERENCE = [case for case in CASES if not case.random]

SUPPORTED = [case for case in CASES if case.on_support]
# Each property runs over about 50 transforms: 10 random problems each keeps the set fast.
few = settings(max_examples=10)


def over(cases: list[Case]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", cases, ids=[case.id for case in cases])


@over(CASES)
@given(problem=problems())
@few
def test_structure_preserved(case: Case, problem: Problem) -> None:
    _asserts.assert_structure_preserved(case, problem)


@over(CASES)
@given(problem=problems())
@few
def test_matches_formula(case: Case, problem: Problem) -> None:
    _asserts.assert_matches_formula(case, problem)


@over(ALONG_REFERENCE)
@given(problem=problems())
@few
def test_keeps_orthogonal_part(case: Case, problem: Problem) -> None:
    _asserts.assert_keeps_orthogonal_part(case, problem)


@over(SUPPORTED)
@given(problem=problems())
@few
def test_writes_nothing_off_support(case: Case, problem: Problem) -> None:
    _asserts.assert_writes_nothing_off_support(case, problem)


@over(REMOVERS)
@given(problem=problems())
@few
def test_removes_aligned(case: Case, problem: Problem) -> None:
    _asserts.assert_removes_aligned(case, problem)


@over(REVERSERS)
@given(problem=problems())
@few
def test_reverses_aligned(case: Case, problem: Problem) -> None:
    _asserts.assert_reverses_aligned(case, problem)


@over(CASES)
@given(problem=problems())
@few
def test_zero_reference_is_noop(case: Case, problem: Problem) -> None:
    _asserts.assert_zero_reference_is_noop(case, problem)


@over(CASES)
@given(problem=problems())
@few
def test_orthogonal_is_noop(case: Case, problem: Problem) -> None:
    _asserts.assert_orthogonal_is_noop(case, problem)


@over(CASES)
@given(problem=problems())
@few
def test_identity_chain_is_noop(case: Case, problem: Problem) -> None:
    _asserts.assert_identity_chain_is_noop(case, problem)


@over(CASES)
@given(problem=problems())
@few
def test_records_cosine_after(case: Case, problem: Problem) -> None:
    _asserts.assert_records_cosine_after(case, problem)
