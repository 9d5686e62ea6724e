"""The chaos run's invariant checks on hand-made rows (default suite: fast)."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import (
    Injected,
    alerts_first,
    commands_once,
    crashes,
    jobs_done,
    quiet_reconnect,
    recoveries,
    results_exactly_once,
    seqs_unique,
    server_errors,
)
from tests.chaos.schedule import Fault


def names(violations: list) -> list[str]:
    return [v.name for v in violations]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ([("d", 1, "j1"), ("d", 2, "j2")], []),
        ([("d", 1, "j1")], ["result_lost"]),
        ([("d", 1, "j1"), ("d", 2, "jX")], ["result_mismatch"]),
        ([("d", 1, "j1"), ("d", 2, "j2"), ("d", 3, "j2")], ["result_stored_twice"]),
    ],
)
def test_results_exactly_once(stored: list, expected: list[str]) -> None:
    accepted = {"d": [(1, "j1"), (2, "j2")]}
    assert names(results_exactly_once(accepted, stored)) == expected


def test_a_seq_used_by_two_kinds_is_reuse() -> None:
    assert seqs_unique([("d", 1, 1), ("d", 2, 2), ("e", 1, 2)]) == []
    assert names(seqs_unique([("d", 1, 1), ("d", 3, 1)])) == ["seq_reused"]


@pytest.mark.parametrize(
    ("commands", "replies", "drained", "expected"),
    [
        ([("d", 1, True, 0)], [("d", 1)], True, []),
        ([("d", 1, True, 0)], [("d", 1), ("d", 1)], False, ["command_executed_twice"]),
        ([("d", 1, False, 0)], [], False, []),
        ([("d", 1, False, 0)], [], True, ["command_not_replied"]),
        ([("d", 1, False, 5_000)], [], True, ["command_not_replied_clock_step"]),
        ([("d", 1, False, 9_000)], [], True, ["command_refused_yet_stored"]),
    ],
)
def test_commands_once_and_replied(
    commands: list, replies: list, drained: bool, expected: list[str]
) -> None:
    steps, refused = {"d": [(4_000, 6_000)]}, {"d": [(8_500, 9_500)]}
    assert names(commands_once(commands, replies, drained, steps, refused)) == expected


@pytest.mark.parametrize(
    ("rows", "checked", "expected"),
    [
        # (kind, created_ms, received_ms); reconnect at 10_000
        ([(3, 5_000, 10_100), (2, 4_000, 10_200)], True, []),
        ([(3, 5_000, 10_100), (2, 4_000, 10_050)], True, []),  # within the tolerance
        ([(3, 5_000, 13_000), (2, 4_000, 10_200)], True, ["alert_after_telemetry"]),
        ([(3, 5_000, 9_000), (2, 4_000, 10_200)], False, []),  # the alert was no backlog
        ([(2, 4_000, 10_200)], False, []),
    ],
)
def test_alerts_drain_before_telemetry(rows: list, checked: bool, expected: list[str]) -> None:
    judged, violations = alerts_first(rows, 10_000, "d")
    assert judged is checked
    assert names(violations) == expected


def injected(kind: str, start: float, end: float, **params: int) -> Injected:
    return Injected(Fault(start, kind, end - start, kind, params), start, end)


def test_a_reconnect_next_to_a_broker_fault_is_not_judged() -> None:
    cut = injected("link_cut", 100, 120)
    assert quiet_reconnect([cut, injected("disk_full", 110, 125)], cut, 0)
    assert not quiet_reconnect([cut, injected("broker_kill", 124, 128)], cut, 0)
    assert quiet_reconnect([cut, injected("broker_kill", 126, 128)], cut, 0)
    assert quiet_reconnect([cut, injected("link_slow", 121, 128, rate_kbit=64)], cut, 0)
    assert not quiet_reconnect([cut, injected("clock_step", 60, 70, offset_s=3600)], cut, 1)
    assert quiet_reconnect([cut, injected("clock_step", 60, 70, offset_s=3600)], cut, 0)


def test_recovery_counts_from_the_last_overlapping_fault() -> None:
    kill = injected("agent_kill", 10, 12, agent=0)
    cut = injected("link_cut", 11, 20)  # on agent0 too: it may stay unhealthy until 20
    health = {"agent0": [(11.0, False), (15.0, False), (21.5, True)]}
    worst, violations = recoveries([kill, cut], health)
    assert violations == []
    assert worst == {"agent_kill": 1.5, "link_cut": 1.5}


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        ({"coord0": [(10.0, False), (50.0, True)]}, ["health_slow"]),
        ({"coord0": [(10.0, False)]}, ["health_not_back"]),
    ],
)
def test_recovery_limit(health: dict, expected: list[str]) -> None:
    _, violations = recoveries([injected("coordinator_kill", 0, 5, replica=0)], health)
    assert names(violations) == expected


def test_exits_and_crash_loops() -> None:
    assert crashes([]) == []
    assert names(crashes([("agent2", 10.0, 1)])) == ["unexpected_exit"]
    loop = [("agent2", t, 1) for t in (10.0, 20.0, 30.0)]
    assert names(crashes(loop))[-1] == "crash_loop"


def job(state: str, created_ms: int = 0, **counts: int) -> dict:
    return {"id": 1, "state": state, "created_ms": created_ms, "counts": counts}


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        ([job("completed", succeeded=3, failed=0)], []),
        ([job("completed", succeeded=2, timed_out=1)], ["job_not_done"]),
        ([job("running", succeeded=2, sent=1)], ["job_not_done"]),
        ([job("running", 5_000, succeeded=2, sent=1)], ["job_not_done_clock_step"]),
    ],
)
def test_jobs_done(jobs: list, expected: list[str]) -> None:
    assert names(jobs_done(jobs, [(4_000, 6_000)])) == expected


def test_server_errors() -> None:
    assert server_errors({"commands": {"202": 9, "503": 2, "TimeoutError": 1}}) == []
    assert server_errors({"loader2": {"200": 9, "507": 3}}) == []
    assert names(server_errors({"commands": {"202": 9, "500": 1}})) == ["http_5xx"]
