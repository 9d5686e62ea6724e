"""The device link's send decisions (link_state.SendState), with no I/O."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.link_state import Cursor, ReadPlan, SendState


def _state() -> SendState:
    return SendState(receipt_timeout_s=10.0, max_unreceipted=3)


def _send(state: SendState, priority: int, seq: int, now: float = 0.0) -> None:
    plan = state.plan()
    assert state.should_send(seq)
    state.mark_sent(priority, seq, now)
    assert state.advance(priority, seq, plan.generation)


def test_a_plan_is_a_snapshot_the_live_state_does_not_move() -> None:
    state = _state()
    _send(state, 3, 1)
    plan = state.plan()
    _send(state, 3, 2)
    state.rewind(0, 5)
    assert plan == ReadPlan(cursor=(3, 1), max_seq_seen=1, generation=0)
    assert state.plan().cursor == (0, 4)


def test_only_messages_newer_than_seen_in_a_more_urgent_tier_jump_ahead() -> None:
    state = _state()
    assert state.plan().find_urgent(lambda c: (0, 99)) is None  # nothing passed: no jump
    _send(state, 2, 10)
    plan = state.plan()
    assert plan.is_new_urgent(0, 11)
    assert not plan.is_new_urgent(0, 9)  # already passed by the cursor's reads
    assert not plan.is_new_urgent(2, 11)  # same tier: FIFO, no jump
    assert not plan.is_new_urgent(3, 11)


def test_a_rewind_bumps_the_generation_and_stops_the_page_in_progress() -> None:
    state = _state()
    _send(state, 3, 1)
    plan = state.plan()
    state.rewind(0, 7)
    assert state.plan().generation == plan.generation + 1
    assert not state.advance(3, 2, plan.generation)  # a stale page may not move the cursor
    assert state.plan().cursor == (0, 6)
    state.rewind(3, 9)  # later in send order than the cursor: no rewind
    assert state.plan().generation == plan.generation + 1


def test_the_window_holds_unreceipted_sends_and_receipts_free_it() -> None:
    state = _state()
    for seq in (1, 2, 3):
        _send(state, 3, seq)
    assert state.window_full()
    assert not state.should_send(2)
    state.receipted([(1, 2)])
    assert not state.window_full()
    assert state.unreceipted == 1
    assert state.should_send(2)


def test_late_receipts_resend_from_the_earliest_and_count_as_resends() -> None:
    state = _state()
    _send(state, 3, 1, now=0.0)
    _send(state, 1, 2, now=0.0)
    _send(state, 3, 3, now=8.0)
    assert state.expire(now=10.0) == 2
    assert state.plan().cursor == (1, 1)  # rewound to just before (1, 2)
    assert state.should_send(1)
    assert state.should_send(2)
    assert not state.should_send(3)
    state.mark_sent(1, 2, 11.0)
    assert (state.sent_total, state.resent_total) == (4, 1)


def test_a_reconnect_sends_everything_unreceipted_again_from_the_start() -> None:
    state = _state()
    _send(state, 3, 1)
    _send(state, 3, 2)
    generation = state.plan().generation
    state.reconnected()
    plan = state.plan()
    assert plan.cursor is None
    assert plan.generation == generation + 1
    assert state.unreceipted == 0
    state.receipted([(2, 2)])  # receipted meanwhile: not counted as a resend later
    _send(state, 3, 1)
    _send(state, 3, 2)
    assert state.resent_total == 1


def test_a_plan_can_be_used_from_another_thread() -> None:
    state = _state()
    _send(state, 2, 5)
    plan = state.plan()
    answers: list[bool] = []
    worker = threading.Thread(target=lambda: answers.append(plan.is_new_urgent(0, 6)))
    worker.start()
    state.rewind(0, 1)  # the loop moves on meanwhile; the plan does not
    worker.join()
    assert answers == [True]


rows = st.sets(st.tuples(st.integers(0, 4), st.integers(1, 60)), max_size=40)


@given(rows, st.integers(0, 4), st.integers(1, 60), st.integers(0, 60))
def test_find_urgent_is_the_first_new_message_of_a_more_urgent_tier(
    queued: set[Cursor], priority: int, seq: int, max_seen: int
) -> None:
    """Against the outbox as a sorted list: the answer is the earliest message in send
    order that is more urgent than the cursor and newer than anything seen."""
    ordered = sorted(queued)
    reads: list[Cursor] = []

    def first_after(cursor: Cursor) -> Cursor | None:
        reads.append(cursor)
        return next((row for row in ordered if row > cursor), None)

    plan = ReadPlan(cursor=(priority, seq), max_seq_seen=max(max_seen, seq), generation=0)
    expected = min(
        (r for r in ordered if r[0] < priority and r[1] > plan.max_seq_seen), default=None
    )
    assert plan.find_urgent(first_after) == expected
    assert len(reads) <= priority
    if all(r[0] >= priority for r in ordered):
        assert len(reads) <= 1  # only the cursor's tier queued: one read answers
