"""The pure decisions behind the HTTP limits (sync/http_limits.py), with made-up numbers."""

from __future__ import annotations

from typing import Any

from dgdm.sync.http_limits import (
    BodyBudget,
    ConnectionTable,
    body_too_slow,
    connection_cap,
    default_body_budget,
)


def test_over_the_total_cap_the_longest_idle_connection_goes() -> None:
    table = ConnectionTable(max_total=3, max_per_peer=10)
    for key in "abc":
        assert table.admit(key, "10.0.0.1") == (True, None)
    table.busy("a")  # a request in progress: never evicted
    assert table.admit("d", "10.0.0.2") == (True, "b")
    table.busy("c")
    table.busy("d")
    assert table.admit("e", "10.0.0.3") == (False, None)  # all busy: the new one is refused
    table.idle("a")
    assert table.admit("e", "10.0.0.3") == (True, "a")
    assert len(table) == 3


def test_the_per_peer_cap_evicts_within_that_peer_only() -> None:
    table = ConnectionTable(max_total=100, max_per_peer=2)
    table.admit("x1", "10.0.0.9")
    table.admit("y1", "10.0.0.7")
    table.admit("x2", "10.0.0.9")
    assert table.admit("x3", "10.0.0.9") == (True, "x1")
    table.busy("x2")
    table.busy("x3")
    assert table.admit("x4", "10.0.0.9") == (False, None)
    assert table.admit("y2", "10.0.0.7") == (True, None)
    # No peer (loopback): only the total cap applies.
    for i in range(10):
        assert table.admit(f"l{i}", None) == (True, None)


def test_removed_connections_free_their_slots() -> None:
    table = ConnectionTable(max_total=1, max_per_peer=1)
    table.admit("a", "p")
    table.busy("a")
    table.remove("a")
    table.remove("a")  # twice (evicted, then its connection_lost): harmless
    table.idle("a")  # a request finishing on a closed connection: ignored
    assert len(table) == 0
    assert table.admit("b", "p") == (True, None)


def test_body_rate_is_a_deadline_by_size() -> None:
    rate = 64 * 1024
    assert not body_too_slow(0, 10 * rate, 1.0, rate, 1.0)  # the first second is free
    assert body_too_slow(rate // 2, 10 * rate, 2.0, rate, 1.0)
    assert not body_too_slow(rate, 10 * rate, 2.0, rate, 1.0)
    assert not body_too_slow(100, 100, 60.0, rate, 1.0)  # all of a small body is enough
    assert body_too_slow(99, 100, 60.0, rate, 1.0)
    assert body_too_slow(10 * rate, None, 12.0, rate, 1.0)  # chunked: the rate alone


def test_budget_and_caps() -> None:
    budget = BodyBudget(100)
    assert budget.reserve(60)
    assert not budget.reserve(41)
    budget.release(60)
    assert budget.reserve(100)
    assert connection_cap(1000, 1024) == 832  # descriptors kept for the rest and a burst
    assert connection_cap(100, 20000) == 100
    assert default_body_budget(24 << 30, 64 << 20) == 256 << 20
    assert default_body_budget(1 << 30, 64 << 20) == 128 << 20  # an eighth of a small box
    assert default_body_budget(256 << 20, 64 << 20) == 64 << 20  # never below one body


def test_accept_failures_are_logged_once_per_period(caplog: Any) -> None:
    import asyncio
    import errno
    import logging

    from dgdm.sync.listener import quiet_accept_errors

    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop, logging.getLogger("dgdm.agent"))
        with caplog.at_level(logging.ERROR, logger="dgdm.agent"):
            for _ in range(5000):  # what asyncio reports on every failed accept()
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
    finally:
        loop.close()
    lines = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(lines) == 1
    assert "Too many open files" in lines[0].error
