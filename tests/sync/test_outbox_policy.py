"""The outbox's pure rules: costs, caps, eviction plans, expiry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync import outbox_policy as policy


@given(max_bytes=st.integers(64 * 1024, 2**34))
def test_page_cap_never_lets_the_file_pass_five_percent(max_bytes) -> None:
    cap = policy.page_cap(max_bytes, 4096)
    assert cap * 4096 <= max_bytes * 1.05
    assert cap > policy.FIXED_PAGES


def test_eviction_tiers_never_include_more_urgent_messages() -> None:
    assert policy.eviction_tiers(3) == (3,)
    assert policy.eviction_tiers(2) == (3, 2)
    assert policy.eviction_tiers(0) == (3, 2, 1, 0)


@given(
    need=st.integers(1, 10_000),
    sizes=st.dictionaries(st.integers(0, 3), st.integers(0, 5_000), max_size=4),
    incoming=st.integers(0, 3),
)
def test_plan_eviction_takes_least_urgent_first_or_refuses(need, sizes, incoming) -> None:
    plan = policy.plan_eviction(need, sizes, incoming)
    evictable = sum(v for p, v in sizes.items() if p >= incoming)
    if evictable < need:
        assert plan is None
        return
    assert plan is not None
    assert sum(plan.values()) == need
    assert all(p >= incoming and 0 < amount <= sizes[p] for p, amount in plan.items())
    # A tier is touched only once every less urgent tier is used up.
    for p in plan:
        assert all(plan.get(q, 0) == sizes.get(q, 0) for q in range(p + 1, 4))


def test_oldest_covering_stops_once_enough_is_freed() -> None:
    rows = [(10, 100), (11, 100), (12, 100), (13, 100)]
    assert policy.oldest_covering(iter(rows), 150) == (11, 2, 200)
    assert policy.oldest_covering(iter(rows), 0) == (0, 0, 0)
    assert policy.oldest_covering(iter(rows), 10_000) == (13, 4, 400)


def test_calibrated_budget_follows_real_page_use() -> None:
    ceiling = policy.row_budget(1 << 20, 4096)
    assert policy.calibrated_budget(0, 0, 1 << 20, 4096) == ceiling
    # Rows taking twice their accounted size halve the budget (toward 97 % fill).
    halved = policy.calibrated_budget(400_000, 800_000, 1 << 20, 4096)
    assert abs(halved - 400_000 * (1 << 20) * 0.97 / 800_000) < 2
    assert policy.calibrated_budget(10, 10, 1 << 20, 4096) == ceiling


def test_expiry_cutoffs_and_wal_size() -> None:
    assert policy.expiry_cutoffs(None, 1_000_000) == {}
    assert policy.expiry_cutoffs({2: 60}, 1_000_000) == {2: 940_000}
    assert policy.wal_pages(256 << 20, 4096, 10 << 30) == 1000
    assert policy.wal_pages(256 << 20, 4096, 2 << 20) == 32
    assert policy.bytes_to_free(90, 20, 100) == 10
    assert policy.bytes_to_free(10, 20, 100) == 0


F = policy.WriteFallback
LAST_SHRINK = policy.MAX_BUDGET_SHRINKS - 1


@pytest.mark.parametrize(
    ("full", "messages", "room", "shrinks", "truncated", "full_mode", "step"),
    [
        # any other SQLite error fails the whole batch
        (False, True, True, 0, False, False, F.FAIL_ALL),
        (False, False, False, 0, True, True, F.FAIL_ALL),
        # SQLITE_FULL with room on the file system: the page cap; evict more, then refuse
        (True, True, True, 0, False, False, F.SHRINK_BUDGET),
        (True, True, True, LAST_SHRINK, True, False, F.SHRINK_BUDGET),
        (True, True, True, policy.MAX_BUDGET_SHRINKS, False, False, F.REFUSE_AT_PAGE_CAP),
        # a full disk: the WAL first, then full mode; receipts alone have nothing to refuse
        (True, True, False, 0, False, False, F.TRUNCATE_WAL),
        (True, False, False, 0, False, False, F.TRUNCATE_WAL),
        (True, True, False, 0, True, False, F.ENTER_FULL_MODE),
        (True, False, False, 0, True, False, F.FAIL_OTHERS),
        (True, True, False, 0, True, True, F.FAIL_OTHERS),
    ],
)
def test_after_write_error(full, messages, room, shrinks, truncated, full_mode, step) -> None:
    assert (
        policy.after_write_error(
            sqlite_full=full,
            has_messages=messages,
            disk_has_room=room,
            shrinks=shrinks,
            wal_truncated=truncated,
            full_mode=full_mode,
        )
        is step
    )


@given(
    messages=st.booleans(),
    room=st.booleans(),
    shrinks=st.integers(0, 100),
    truncated=st.booleans(),
    full_mode=st.booleans(),
)
def test_a_full_disk_never_loops_on_the_budget(messages, room, shrinks, truncated, full_mode):
    """Only a batch with messages and room on disk shrinks the budget, and never forever."""
    step = policy.after_write_error(
        sqlite_full=True,
        has_messages=messages,
        disk_has_room=room and messages,
        shrinks=shrinks,
        wal_truncated=truncated,
        full_mode=full_mode,
    )
    if step is F.SHRINK_BUDGET:
        assert messages
        assert room
        assert shrinks < policy.MAX_BUDGET_SHRINKS
    if truncated and not (messages and room):
        assert step in (F.FAIL_OTHERS, F.ENTER_FULL_MODE)
