"""The coordinator's fair ingest queue: bounds, priority order, round robin, FIFO per device."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.coordinator.fairqueue import FairQueue, QueueLimits
from dgdm.sync.envelope import Kind


def test_one_device_backlog_costs_another_one_slot_per_turn() -> None:
    q = FairQueue()
    for i in range(1000):
        assert q.push("flooder", Kind.TELEMETRY, b"t%d" % i) is None
    q.push("quiet", Kind.TELEMETRY, b"q")
    batch = q.take(10, 1 << 20)
    assert [m.device_id for m in batch[:2]] == ["flooder", "quiet"]
    assert len(batch) == 10


def test_tiers_in_priority_order_alerts_replies_results_telemetry() -> None:
    q = FairQueue()
    for kind in (Kind.TELEMETRY, Kind.RESULT, Kind.REPLY, Kind.ALERT):
        q.push("d", kind, kind.name.encode())
    assert [m.kind for m in q.take(10, 1 << 20)] == [
        Kind.ALERT,
        Kind.REPLY,
        Kind.RESULT,
        Kind.TELEMETRY,
    ]


def test_device_bound_refuses_only_that_device() -> None:
    q = FairQueue(QueueLimits(device_messages=3, total_messages=100))
    assert [q.push("a", Kind.RESULT, b"x") for _ in range(4)] == [
        None,
        None,
        None,
        "device_queue_full",
    ]
    assert q.push("b", Kind.RESULT, b"x") is None
    assert q.push("a", Kind.RESULT, b"x" * 0) == "device_queue_full"


def test_device_byte_bound() -> None:
    q = FairQueue(QueueLimits(device_bytes=100))
    assert q.push("a", Kind.RESULT, b"x" * 60) is None
    assert q.push("a", Kind.RESULT, b"x" * 60) == "device_queue_full"
    assert q.push("b", Kind.RESULT, b"x" * 60) is None


def test_global_bound_saturates_and_resumes_below_the_ratio() -> None:
    q = FairQueue(QueueLimits(total_messages=10, resume_ratio=0.5))
    for i in range(10):
        assert q.push(f"d{i}", Kind.RESULT, b"x") is None
    assert q.saturated
    assert q.push("d99", Kind.RESULT, b"x") == "queue_full"
    q.take(4, 1 << 20)
    assert not q.saturated
    assert not q.resumable
    q.take(1, 1 << 20)
    assert q.resumable


def test_take_respects_bytes_but_always_takes_one() -> None:
    q = FairQueue()
    q.push("a", Kind.RESULT, b"x" * 1000)
    q.push("b", Kind.RESULT, b"x" * 1000)
    assert len(q.take(10, 10)) == 1
    assert len(q.take(10, 10)) == 1
    assert q.take(10, 10) == []
    assert q.messages == 0
    assert q.bytes == 0
    assert q.devices() == 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.sampled_from([Kind.RESULT, Kind.TELEMETRY, Kind.ALERT, Kind.REPLY]),
            st.binary(max_size=20),
        ),
        max_size=200,
    ),
    st.integers(1, 50),
)
def test_nothing_lost_or_reordered_within_device_and_kind(items, per_take) -> None:
    q = FairQueue(QueueLimits(device_messages=30, total_messages=80))
    accepted = []
    for device, kind, payload in items:
        if q.push(device, kind, payload) is None:
            accepted.append((device, kind, payload))
    assert q.messages == len(accepted)
    out = []
    while q.messages:
        batch = q.take(per_take, 1 << 20)
        assert 1 <= len(batch) <= per_take
        out += [tuple(m) for m in batch]
    assert sorted(out) == sorted(accepted)
    for device in "abcd":
        for kind in Kind:
            assert [m for m in out if m[:2] == (device, kind)] == [
                m for m in accepted if m[:2] == (device, kind)
            ]
    assert q.bytes == 0
    assert q.devices() == 0
