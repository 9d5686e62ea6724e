"""The numbered migration scheme's rules (sync/migrations.py), shared by the outbox and the
coordinator's stores: what is pending, in which order, and a database newer than the code."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.migrations import TooNew, checked, latest, numbered, pending


@dataclass(frozen=True)
class Step:
    version: int
    description: str = "x"


def steps(n: int) -> tuple[Step, ...]:
    return numbered([Step(v) for v in range(1, n + 1)])


@given(st.integers(0, 20).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pending_is_every_later_version_in_order(case: tuple[int, int]) -> None:
    n, current = case
    assert [m.version for m in pending(current, steps(n))] == list(range(current + 1, n + 1))


def test_a_database_newer_than_the_code_is_refused() -> None:
    with pytest.raises(TooNew) as info:
        pending(9, steps(6))
    assert str(info.value) == "schema version 9, newer than the 6 this dgdm-edge knows"
    assert (info.value.found, info.value.known) == (9, 6)
    assert checked(6, steps(6)) == 6
    assert latest(()) == 0


@pytest.mark.parametrize("versions", [[2], [1, 3], [1, 2, 2], [2, 1]])
def test_migrations_must_be_numbered_one_two_three(versions: list[int]) -> None:
    with pytest.raises(ValueError, match="stands where"):
        numbered([Step(v) for v in versions])
