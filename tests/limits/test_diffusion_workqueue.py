"""The work queue's deadlines in process (issue 20, items 3-5): a job is stopped, not only
abandoned, when its request goes away or the agent drains; a job that cannot be
interrupted is answered 504 after the grace and reported stuck until it ends; the heavy
lane leaves the light one free."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dgdm.agent.errors import QueueFull, ShuttingDown
from dgdm.agent.work import STOP_GRACE_S, WorkQueue
from dgdm.kernels import deadline
from dgdm.kernels.errors import DeadlineExceeded


def cooperative(seconds: float, ended: threading.Event) -> str:
    """A kernel loop: checks its deadline every millisecond."""
    try:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            deadline.check()
            time.sleep(0.001)
        return "done"
    finally:
        ended.set()


async def test_a_cancelled_request_stops_its_job() -> None:
    work = WorkQueue(1, 4)
    ended = threading.Event()
    task = asyncio.create_task(work.run(cooperative, 30.0, ended))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(ended.wait, 2.0)
    assert await work.run(cooperative, 0.0, threading.Event()) == "done"  # the worker is free
    work.close()


async def test_drain_stops_what_would_outlive_it() -> None:
    work = WorkQueue(1, 4)
    short = asyncio.create_task(work.run(cooperative, 0.2, threading.Event()))
    long = asyncio.create_task(work.run(cooperative, 60.0, threading.Event(), heavy=True))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    assert await work.drain(STOP_GRACE_S + 1.0)
    assert time.monotonic() - start < STOP_GRACE_S + 1.0
    assert await short == "done"
    with pytest.raises(ShuttingDown):
        await long
    work.close()


async def test_an_uninterruptible_job_is_answered_and_reported_stuck() -> None:
    work = WorkQueue(1, 0, deadline_s=0.2)
    release = threading.Event()
    job = asyncio.create_task(work.run(release.wait, 30.0, heavy=True))
    await asyncio.sleep(0.1)
    with pytest.raises(QueueFull):  # its lane is full ...
        await work.run(release.wait, 1.0, heavy=True)
    assert await work.run(time.sleep, 0.0) is None  # ... the light one is not
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not stop in time"):
        await job
    assert time.monotonic() - start < STOP_GRACE_S + 0.5
    await asyncio.sleep(0.2)
    assert work.stuck()
    release.set()
    await asyncio.sleep(0.2)
    assert not work.stuck()
    assert work.in_flight == 0
    work.close()
