"""The shared unknown-field rule: every JSON parser names the same key for the same body."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.common.fields import unknown_field

KNOWN = frozenset({"source", "target", "weight"})


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([], None),
        (["source", "target"], None),
        (["source", "zeta", "alpha"], "alpha"),  # the first in sorted order, not in body order
        (["weight", "bogus"], "bogus"),
    ],
)
def test_names_the_first_unknown_key_in_sorted_order(keys: list[str], expected: str | None) -> None:
    assert unknown_field(dict.fromkeys(keys, 1), KNOWN) == expected


@given(st.lists(st.text(max_size=8), max_size=12))
def test_the_answer_does_not_depend_on_member_order(keys: list[str]) -> None:
    found = unknown_field(keys, KNOWN)
    assert found == unknown_field(list(reversed(keys)), KNOWN)
    assert (found is None) == (set(keys) <= KNOWN)
    assert found is None or found not in KNOWN
