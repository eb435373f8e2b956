"""The mutation run's mutants still apply to the source (the run itself is not a test)."""

from __future__ import annotations

import pytest

from tests.mutation.run import CORE_TESTS, MUTANTS, ROOT, Mutant, check_mutants, mutate


def test_every_mutant_applies_exactly_once_to_the_current_source() -> None:
    # A refactor that renames or rewrites the code a mutant names must update the mutant,
    # instead of the mutation run silently testing nothing.
    assert check_mutants() == []
    assert len(MUTANTS) >= 12


def test_every_core_test_file_exists() -> None:
    assert [path for path in CORE_TESTS if not (ROOT / path).exists()] == []


def test_a_mutant_that_is_not_found_once_is_refused() -> None:
    absent = Mutant("absent", "gradlens/alignment/gradops.py", "no such text", "x", "")
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutate("some source", absent)
    twice = Mutant("twice", "gradlens/alignment/gradops.py", "a", "b", "")
    with pytest.raises(ValueError, match="occurs 2 times"):
        mutate("a a", twice)
    assert mutate("x = a > 0", Mutant("ge", "f.py", "a > 0", "a >= 0", "")) == "x = a >= 0"
