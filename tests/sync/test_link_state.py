"""The device link's send decisions (link_state.SendState), with no I/O."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.link_state import (
    COMMAND_WINDOW,
    GAP_GRACE_S,
    MAX_GAP_RESENDS,
    Cursor,
    ExecutedCommands,
    ReadPlan,
    SendState,
)


def _state() -> SendState:
    return SendState(receipt_timeout_s=10.0, max_unreceipted=3)


def _send(state: SendState, priority: int, seq: int, now: float = 0.0, kind: int = 1) -> None:
    plan = state.plan()
    assert state.should_send(seq)
    state.mark_sent(priority, seq, now, kind)
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
    state.receipted([(1, 2)], 0.0)
    assert not state.window_full()
    assert state.unreceipted == 1
    assert state.should_send(2)


def test_late_receipts_resend_from_the_earliest_and_count_as_resends() -> None:
    state = _state()
    _send(state, 3, 1, now=0.0)
    _send(state, 1, 2, now=0.0)
    _send(state, 3, 3, now=8.0)
    assert state.expire(now=10.0) == (2, 0)
    assert state.plan().cursor == (1, 1)  # rewound to just before (1, 2)
    assert state.should_send(1)
    assert state.should_send(2)
    assert not state.should_send(3)
    state.mark_sent(1, 2, 11.0, 1)
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
    state.receipted([(2, 2)], 0.0)  # receipted meanwhile: not counted as a resend later
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


# -- lost while PUBACKed: gaps (issue 19 item 5) --------------------------------------------
# Rows: sends as (seq, kind) in send order on one connection, the receipted seqs, and the
# seqs that are gaps: unreceipted, of a kind one of whose LATER sends was receipted.
GAP_TABLE = [
    ([(1, 1), (2, 1), (3, 1)], [2, 3], [1]),  # the first result was dropped
    ([(1, 1), (2, 1), (3, 1)], [1, 2], []),  # a prefix: the rest is still on its way
    ([(1, 1), (2, 2), (3, 1)], [3], [1]),  # same kind only: 2 (another kind) waits
    ([(1, 1), (2, 2), (3, 2)], [3], [2]),
    ([(1, 1), (2, 2)], [2], []),  # kinds are independent (alerts overtake results)
    ([(1, 1), (2, 1), (3, 1), (4, 1)], [4], [1, 2, 3]),
    ([(5, 1), (3, 1)], [5], []),  # 3 was sent after 5 (a resend): not a gap
    ([], [7], []),  # a receipt for something of an earlier connection
]


@pytest.mark.parametrize(("sends", "receipted", "gaps"), GAP_TABLE)
def test_a_gap_in_the_receipts_of_a_kind_is_lost_after_the_grace(
    sends: list[tuple[int, int]], receipted: list[int], gaps: list[int]
) -> None:
    state = SendState(receipt_timeout_s=60.0, max_unreceipted=100)
    for seq, kind in sends:
        _send(state, kind, seq, kind=kind)
    assert state.receipted([(s, s) for s in receipted], now=0.25) == len(gaps)
    assert state.expire(now=0.25 + GAP_GRACE_S / 2) == (0, 0)  # a slower replica may answer
    assert state.expire(now=0.25 + GAP_GRACE_S) == (0, len(gaps))
    for seq in gaps:
        assert state.should_send(seq)
    sent = {seq for seq, _ in sends}
    assert state.unreceipted == len(sent - set(receipted)) - len(gaps)


def test_a_gap_receipted_within_the_grace_is_not_resent() -> None:
    state = _state()
    _send(state, 3, 1, now=4.9)
    _send(state, 3, 2, now=4.9)
    assert state.receipted([(2, 2)], now=5.0) == 1
    state.receipted([(1, 1)], now=5.5)  # another coordinator's receipt came after all
    assert state.expire(now=5.0 + GAP_GRACE_S) == (0, 0)


def test_a_gap_is_resent_once_per_connection_then_waits_for_the_timeout() -> None:
    state = SendState(receipt_timeout_s=60.0, max_unreceipted=100)
    _send(state, 3, 1, now=0.0)
    _send(state, 3, 2, now=0.0)
    state.receipted([(2, 2)], now=0.1)
    assert state.expire(now=0.1 + GAP_GRACE_S) == (0, 1)
    _send(state, 3, 1, now=3.0)  # the resend, dropped again (a coordinator over quota)
    _send(state, 3, 4, now=3.0)
    assert state.receipted([(4, 4)], now=3.1) == 0  # no second fast resend
    assert state.expire(now=30.0) == (0, 0)
    assert state.expire(now=63.0) == (1, 0)  # the receipt timeout still holds
    state.reconnected()  # a new connection: gaps may be resent once again
    _send(state, 3, 1, now=70.0)
    _send(state, 3, 5, now=70.0)
    assert state.receipted([(5, 5)], now=71.0) == 1


def test_gap_resends_are_rate_limited_per_tick() -> None:
    state = SendState(receipt_timeout_s=600.0, max_unreceipted=10 * MAX_GAP_RESENDS)
    total = 2 * MAX_GAP_RESENDS + 1
    for seq in range(1, total + 1):
        _send(state, 3, seq)
    assert state.receipted([(total, total)], now=0.0) == total - 1
    assert state.expire(now=GAP_GRACE_S)[1] == MAX_GAP_RESENDS
    assert state.expire(now=GAP_GRACE_S + 1)[1] == MAX_GAP_RESENDS
    assert state.gap_resent_total == 2 * MAX_GAP_RESENDS


def test_a_coordinator_appearing_resends_what_was_sent_before_it() -> None:
    state = SendState(receipt_timeout_s=60.0, max_unreceipted=100)
    _send(state, 3, 1, now=1.0)
    _send(state, 1, 2, now=2.0)
    _send(state, 3, 3, now=5.0)  # after the coordinator appeared (at 4.0): it got that
    state.receipted([(1, 1)], now=4.5)
    assert state.presumed_lost(sent_before=4.0) == 1
    assert state.should_send(2)
    assert not state.should_send(3)
    assert state.plan().cursor == (1, 1)  # rewound: it goes next, paced like any send
    assert state.presumed_lost(sent_before=4.0) == 0


def test_the_gap_grace_follows_a_slow_coordinator() -> None:
    state = SendState(receipt_timeout_s=60.0, max_unreceipted=100)
    _send(state, 3, 1, now=0.0)
    _send(state, 3, 2, now=0.0)
    _send(state, 3, 3, now=0.0)
    assert state.receipted([(3, 3)], now=4.0) == 2  # a 4 s receipt latency
    assert state.expire(now=4.0 + GAP_GRACE_S) == (0, 0)
    assert state.expire(now=4.0 + 7.9) == (0, 0)
    assert state.expire(now=4.0 + 8.0) == (0, 2)


# -- executed command seqs -------------------------------------------------------------------


def test_a_late_lower_command_seq_still_runs_once() -> None:
    """Two replicas (or a delayed publish) deliver 5 before 4: 4 still runs, each once."""
    executed = ExecutedCommands()
    for seq in (1, 2, 3, 5):
        assert not executed.seen(seq)
        executed = executed.add(seq)
    assert not executed.seen(4)
    assert (executed.floor, executed.above) == (3, frozenset({5}))
    executed = executed.add(4)
    assert (executed.floor, executed.above) == (5, frozenset())
    assert all(executed.seen(s) for s in range(6))


def test_the_window_bounds_what_is_kept() -> None:
    executed = ExecutedCommands().add(1).add(5000)
    assert executed.floor == 5000 - COMMAND_WINDOW
    assert executed.seen(100)  # too far behind to be told apart: refused as a replay
    assert not executed.seen(5000 - COMMAND_WINDOW + 1)


@given(st.lists(st.integers(1, 3000), max_size=200))
def test_executed_seqs_are_never_run_again_and_survive_encoding(seqs: list[int]) -> None:
    executed = ExecutedCommands()
    ran: set[int] = set()
    for seq in seqs:
        if not executed.seen(seq):
            ran.add(seq)
            executed = executed.add(seq)
        assert executed.seen(seq)
        assert len(executed.above) <= COMMAND_WINDOW
        executed = ExecutedCommands.decode(executed.encode())
    assert all(executed.seen(s) for s in ran)
    # Nothing that arrived within the window of the highest one was refused unseen.
    top = max(seqs, default=0)
    for seq in set(seqs):
        if seq > top - COMMAND_WINDOW:
            assert seq in ran


def test_the_older_persisted_form_is_the_last_executed_seq() -> None:
    executed = ExecutedCommands.decode("41")
    assert executed.seen(41)
    assert not executed.seen(42)
    assert ExecutedCommands.decode(None) == ExecutedCommands()


def test_a_started_command_is_running_until_replied_and_survives_encoding() -> None:
    executed = ExecutedCommands().start(3)
    assert executed.running == 3
    assert executed.seen(3)
    assert ExecutedCommands.decode(executed.encode()) == executed
    assert executed.replied().running is None
    assert executed.replied().seen(3)
