"""Jobs' pure decisions as tables: per-device transitions, the failure gate and its
minimum sample, the job's outcome, the pacing of sends, and the request's validation
(every bad field named)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.coordinator.jobs import (
    DECIDED,
    TARGET_STATES,
    BadJob,
    gate,
    job_outcome,
    min_sample,
    pace,
    parse_job,
    reply_event,
    step,
)

EVENTS = ("claim", "ttl_expired", "cancel", "reply_ok", "reply_error", "reply_timeout")

# Every (state, event): what a device's job state becomes. Decided states never move.
TABLE = {
    "queued": {
        "claim": "sent",
        "ttl_expired": "timed_out",
        "cancel": "cancelled",
        "reply_ok": "queued",
        "reply_error": "queued",
        "reply_timeout": "queued",
    },
    "sent": {
        "claim": "sent",
        "ttl_expired": "timed_out",
        "cancel": "sent",  # already on its way: its outcome is still recorded
        "reply_ok": "succeeded",
        "reply_error": "failed",
        "reply_timeout": "timed_out",
    },
    **{s: dict.fromkeys(EVENTS, s) for s in DECIDED},
}


@pytest.mark.parametrize("state", TARGET_STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_target_transitions(state: str, event: str) -> None:
    assert step(state, event) == TABLE[state][event]


@pytest.mark.parametrize(
    ("reply", "event"),
    [
        ({"ok": True}, "reply_ok"),
        ({"ok": False, "error": "no"}, "reply_error"),
        ({"ok": 1}, "reply_error"),  # only a JSON true is success
        ({}, "reply_error"),
    ],
)
def test_reply_events(reply: dict[str, Any], event: str) -> None:
    assert reply_event(reply) == event


@pytest.mark.parametrize(
    ("total", "sample"), [(1, 1), (3, 3), (5, 5), (10, 5), (49, 5), (50, 5), (51, 6), (500, 50)]
)
def test_min_sample(total: int, sample: int) -> None:
    assert min_sample(total) == sample


@pytest.mark.parametrize(
    ("counts", "total", "ratio", "stop"),
    [
        ({"failed": 4}, 100, 0.1, False),  # below the sample of 10
        ({"failed": 2, "succeeded": 8}, 100, 0.1, True),  # 20 % of 10 decided
        ({"failed": 1, "succeeded": 9}, 100, 0.1, False),  # exactly 10 %: not above
        ({"timed_out": 2, "succeeded": 8}, 100, 0.1, True),  # timeouts are failures
        ({"cancelled": 50, "succeeded": 9, "failed": 1}, 100, 0.1, False),  # not counted
        ({"failed": 3}, 3, 0.5, True),  # a small job is judged on all of it
        ({"failed": 2}, 3, 0.5, False),
        ({"failed": 1}, 1, 0.1, True),
        ({"failed": 10}, 10, 1.0, False),  # ratio 1: never stops
        ({"succeeded": 10}, 10, 0.0, False),
        ({"failed": 1, "succeeded": 9}, 10, 0.0, True),  # ratio 0: any failure stops
    ],
)
def test_failure_gate(counts: dict[str, int], total: int, ratio: float, stop: bool) -> None:
    assert gate(counts, total, ratio) is stop


@pytest.mark.parametrize(
    ("counts", "total", "outcome"),
    [
        ({"queued": 3}, 3, "running"),
        ({"sent": 1, "succeeded": 2}, 3, "running"),
        ({"succeeded": 3}, 3, "completed"),
        ({"succeeded": 9, "failed": 1}, 10, "completed"),  # 10 %: not above 10 %
        ({"succeeded": 2, "cancelled": 1}, 3, "completed"),
        ({"failed": 5, "queued": 95}, 100, "running"),  # below the sample of 10
        ({"failed": 5, "succeeded": 5, "queued": 90}, 100, "aborted"),
    ],
)
def test_job_outcome(counts: dict[str, int], total: int, outcome: str) -> None:
    assert job_outcome(counts, total, 0.1) == outcome


@pytest.mark.parametrize(
    ("next_ms", "now", "rate", "wanted", "due", "new_next"),
    [
        (0, 10_000, 10, 100, 10, 10_100),  # a fresh job: one second's worth at most
        (10_000, 10_000, 10, 100, 1, 10_100),
        (10_100, 10_050, 10, 100, 0, 10_100),  # not yet
        (10_100, 10_250, 10, 100, 2, 10_300),  # catching up 150 ms: 2 sends
        (10_000, 10_000, 10, 0, 0, 10_000),  # nothing to send: the pace is kept
        (0, 10_000, 0.5, 100, 1, 12_000),  # slower than 1/s: one send per 2 s
        (12_000, 11_000, 0.5, 100, 0, 12_000),
        (12_000, 13_000, 0.5, 100, 1, 15_000),
        (0, 10_000, 1000, 5, 5, 9_006),  # fewer wanted than due
    ],
)
def test_pace(next_ms: int, now: int, rate: float, wanted: int, due: int, new_next: int) -> None:
    assert pace(next_ms, now, rate, wanted) == (due, new_next)


@given(
    st.floats(0.1, 1000),
    st.lists(st.integers(0, 500), min_size=1, max_size=60),
    st.integers(1, 50),
)
def test_pace_never_exceeds_the_rate(rate: float, gaps: list[int], wanted: int) -> None:
    """Over any sequence of ticks, sends stay within rate * elapsed + one second's worth."""
    now, next_ms, sent = 1_000_000, 0, 0
    start = now
    for gap in gaps:
        now += gap
        due, next_ms = pace(next_ms, now, rate, wanted)
        assert 0 <= due <= wanted
        sent += due
    assert sent <= rate * (now - start) / 1000 + max(1, rate) + 1


GOOD: dict[str, Any] = {"target": "all", "command": {"cmd": "ping"}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target": None}, "target"),
        ({"target": "some"}, "target"),
        ({"target": {"tags": {}, "ids": []}}, "target"),
        ({"target": {"tags": {}}}, "target.tags"),
        ({"target": {"tags": {"Site": "x"}}}, "target.tags"),
        ({"target": {"tags": {f"k{i}": "v" for i in range(17)}}}, "target.tags"),
        ({"target": {"tags": ["site=berlin"]}}, "target.tags"),
        ({"target": {"ids": []}}, "target.ids"),
        ({"target": {"ids": ["ok", "not/ok"]}}, "target.ids"),
        ({"target": {"ids": "edge-1"}}, "target.ids"),
        ({"command": None}, "command"),
        ({"command": {"cmd": "reboot"}}, "command.cmd"),
        ({"command": {"cmd": "ping", "args": [1]}}, "command.args"),
        ({"command": {"cmd": "ping", "ttl_ms": 5}}, "command.ttl_ms"),
        ({"command": {"cmd": "diffuse", "args": {}}}, "command.args.graph"),
        ({"rate_per_s": 0}, "rate_per_s"),
        ({"rate_per_s": 1001}, "rate_per_s"),
        ({"rate_per_s": "10"}, "rate_per_s"),
        ({"rate_per_s": True}, "rate_per_s"),
        ({"max_failure_ratio": -0.1}, "max_failure_ratio"),
        ({"max_failure_ratio": 1.5}, "max_failure_ratio"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 86_401}, "timeout_s"),
        ({"ttl_ms": 0}, "ttl_ms"),
        ({"ttl_ms": 1.5}, "ttl_ms"),
        ({"ttl_ms": 7 * 24 * 3600 * 1000 + 1}, "ttl_ms"),
        ({"priority": 1}, "priority"),
    ],
)
def test_bad_requests_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(BadJob) as caught:
        parse_job({**GOOD, **change})
    assert caught.value.field == field


def test_a_good_request_with_defaults() -> None:
    spec = parse_job(
        {"target": {"tags": {"site": "berlin"}}, "command": {"cmd": "set_config", "args": {}}}
    )
    assert spec.target.as_json() == {"tags": {"site": "berlin"}}
    assert spec.command == {"cmd": "set_config", "args": {}}
    assert (spec.rate_per_s, spec.max_failure_ratio, spec.timeout_s, spec.ttl_ms) == (
        10.0,
        0.1,
        60.0,
        3_600_000,
    )
    assert parse_job({**GOOD, "target": {"ids": ["a", "b", "a"]}}).target.ids == ("a", "b")
    with pytest.raises(BadJob) as caught:
        parse_job([GOOD])
    assert caught.value.field == "body"
