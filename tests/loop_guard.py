"""The loop-blocking guard (STYLE: blocking work never runs on the loop), for every async
test of the agent and the link.

Each callback the event loop runs is timed in CPU time of the loop thread
(`time.thread_time`): work done on the loop shows up there whatever else the machine is
doing, whereas wall-clock lag on a shared 2-core box also measures other processes. A test
fails when one callback took more than `MAX_BLOCK_S` of it, naming the callback; one over
`REPORT_S` is listed in the run's summary.

It applies to coroutine tests under tests/agent and tests/sync. A test whose own code
blocks on purpose (building a large body inline, say) says so with
`@pytest.mark.blocks_loop("why")`; `loop_meter` gives a test the meter to read itself.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterator
from typing import Any

import pytest

# A callback over REPORT_S is listed in the run's summary; over MAX_BLOCK_S it fails the
# test. Loop-thread CPU still varies with what ran before (a first import, a cold cache,
# a burst a paused reader drains at once), so the failing bound is the gross one.
REPORT_S = 0.100
MAX_BLOCK_S = 0.500
_SLOW: list[tuple[str, float, str]] = []
GUARDED = ("tests/agent/", "tests/sync/")


class CallbackMeter:
    """Records the most loop-thread CPU time any one callback took, and which one."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.culprit = ""
        self._original: Any = None

    def reset(self) -> None:
        self.worst, self.culprit = 0.0, ""

    def install(self) -> None:
        original = self._original = asyncio.events.Handle._run
        meter = self

        def timed_run(handle: Any) -> None:
            start = time.thread_time()
            try:
                original(handle)
            finally:
                spent = time.thread_time() - start
                if spent > meter.worst:
                    meter.worst, meter.culprit = spent, repr(handle)[:300]

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]

    def remove(self) -> None:
        if self._original is not None:
            asyncio.events.Handle._run = self._original  # type: ignore[method-assign]
            self._original = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "blocks_loop(reason): the test's own code blocks the loop; no loop guard"
    )


def _guarded(item: pytest.Item) -> bool:
    path = str(getattr(item, "path", "")).replace("\\", "/")
    function = getattr(item, "function", None)
    return (
        any(part in path for part in GUARDED)
        and inspect.iscoroutinefunction(function)
        and item.get_closest_marker("blocks_loop") is None
    )


@pytest.fixture
def loop_meter() -> Iterator[CallbackMeter]:
    """A meter of the test's own, for a test that reads it (e.g. over one request)."""
    meter = CallbackMeter()
    meter.install()
    yield meter
    meter.remove()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Meters the test body (not its fixtures' start and stop) and fails the test when one
    callback held the loop too long."""
    if not _guarded(item):
        return (yield)
    meter = CallbackMeter()
    meter.install()
    try:
        result = yield
    finally:
        meter.remove()
    if meter.worst > MAX_BLOCK_S:
        pytest.fail(
            f"a loop callback ran {meter.worst * 1000:.0f} ms of CPU on the event loop "
            f"(limit {MAX_BLOCK_S * 1000:.0f} ms): {meter.culprit}",
            pytrace=False,
        )
    if meter.worst > REPORT_S:
        _SLOW.append((item.nodeid, meter.worst, meter.culprit))
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _SLOW:
        return
    terminalreporter.section(f"loop callbacks over {REPORT_S * 1000:.0f} ms of CPU")
    for nodeid, worst, culprit in sorted(_SLOW, key=lambda s: -s[1]):
        terminalreporter.write_line(f"{worst * 1000:6.0f} ms  {nodeid}  {culprit[:120]}")
