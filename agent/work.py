"""Where blocking work runs: two bounded lanes of worker threads, and a parser process for
large bodies.

`WorkQueue` admits at most `workers + queue_size` jobs (running + waiting) to its light
lane and `heavy_workers + min(queue_size, HEAVY_QUEUE)` to its heavy lane: a job that finds its lane
full is refused at once (`QueueFull`, HTTP 503 + Retry-After) instead of piling up. The
caller picks the lane (agent/diffusion.py, by the engine's cost estimate), so one heavy
diffusion never holds up the small ones behind it.

Every job has a deadline (`kernels.deadline_s`, or a request's own, lower one), applied in
its worker thread: the kernels' loops check it between products with T and end the job
with `DeadlineExceeded` (HTTP 504). A job that cannot be interrupted (a LAPACK call, scipy's
expm_multiply) is answered 504 anyway STOP_GRACE_S after its deadline and shows in
`stuck()` (/healthz) until it ends. Stopping (`drain`) stops every job that would outlive
the drain window. Workers are daemon threads: a kernel that never returns cannot keep a
stopping agent alive past systemd's TimeoutStopSec (ThreadPoolExecutor joins its threads
at exit); the outbox is closed before the process ends, so nothing durable is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dgdm.agent.errors import BadJson, QueueFull, ShuttingDown
from dgdm.agent.jsonio import loads
from dgdm.kernels.deadline import Deadline, applied
from dgdm.kernels.errors import DeadlineExceeded, GraphError

if TYPE_CHECKING:
    from dgdm.kernels.graph import Graph, Limits

T = TypeVar("T")
log = logging.getLogger(__name__)
# How long past its deadline a job may take to stop before its request is answered 504
# without it and its worker counts as stuck.
STOP_GRACE_S = 2.0
# Heavy jobs waiting at most: each may take up to its deadline, so a longer queue would
# only hand its last ones a 504 after waiting.
HEAVY_QUEUE = 4
# The heavy lane's threads run at this niceness: on two loaded cores a heavy diffusion
# otherwise takes CPU time the small ones' worker and the event loop need.
HEAVY_NICE = 10
SHUTDOWN = "the agent is shutting down: the diffusion was stopped"
CANCELLED = "the request went away: the diffusion was stopped"


def parse_graph_body(data: bytes | str | dict[str, Any], limits: Limits) -> Graph:
    from dgdm.kernels.graph import parse_graph, parse_graph_bytes

    if isinstance(data, bytes):
        return parse_graph_bytes(data, loads, limits)
    return parse_graph(loads(data) if isinstance(data, str) else data, limits)


def _parse_in_child(data: bytes, limits: Limits) -> tuple[str, Any]:
    """Runs in the parser process. Errors come back as values: GraphError's constructor
    does not survive pickling."""
    try:
        return "ok", parse_graph_body(data, limits)
    except GraphError as exc:
        return "graph_error", (exc.field, exc.message, exc.code)
    except BadJson as exc:
        return "bad_json", str(exc)


class GraphParser:
    """A one-process pool for large bodies; `parse` blocks the calling worker thread only."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def parse(self, data: bytes, limits: Limits) -> Graph:
        status, value = self._executor().submit(_parse_in_child, data, limits).result()
        if status == "graph_error":
            field, message, code = value
            raise GraphError(field, message, code=code)
        if status == "bad_json":
            raise BadJson(value)
        return value

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                import multiprocessing

                context = multiprocessing.get_context("forkserver")
                self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context)
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None


class _Lane:
    """Daemon worker threads taking jobs in order (see the module docstring for why not a
    ThreadPoolExecutor)."""

    def __init__(self, name: str, workers: int, capacity: int, nice: int = 0) -> None:
        self.capacity = capacity
        self._nice = nice
        self.in_flight = 0
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"dgdm-{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        if self._nice:
            _lower_priority(self._nice)
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the job
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """fn(*args) on the loop; nothing once it is closed (a stuck job ending at exit)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _lower_priority(nice: int) -> None:
    """Make this thread (a Linux task of its own) yield the CPU to the loop and the light
    lane on a busy box. The unit's seccomp filter refuses setpriority (EPERM): then the
    heavy lane shares the CPU like any thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:
        log.debug("heavy lane keeps its priority: %s", exc)


class WorkQueue:
    """Two bounded lanes of workers, each job under a deadline (see the module docstring)."""

    def __init__(
        self,
        workers: int,
        queue_size: int,
        *,
        heavy_workers: int = 1,
        deadline_s: float = 30.0,
    ) -> None:
        self._light = _Lane("work", workers, workers + queue_size)
        heavy_capacity = heavy_workers + min(queue_size, HEAVY_QUEUE)
        self._heavy = _Lane("heavy", heavy_workers, heavy_capacity, nice=HEAVY_NICE)
        self.capacity = self._light.capacity + self._heavy.capacity
        self.deadline_s = deadline_s
        self.in_flight = 0
        self.accepting = True
        self._admitted: dict[Deadline, bool] = {}  # -> running in a worker now
        self._admitted_lock = threading.Lock()
        self._idle = asyncio.Event()
        self._idle.set()

    def deadline(self, seconds: float | None = None) -> Deadline:
        """A deadline from now: `kernels.deadline_s`, or a request's lower one."""
        return Deadline(self.deadline_s if seconds is None else min(seconds, self.deadline_s))

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the agent is shutting down")

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        deadline: Deadline | None = None,
        heavy: bool = False,
    ) -> T:
        """fn(*args) in a worker of the chosen lane, under `deadline` (default: a new one)."""
        self.check_accepting()
        deadline = deadline or self.deadline()
        deadline.check()  # e.g. spent waiting for its body
        lane = self._heavy if heavy else self._light
        if lane.in_flight >= lane.capacity:
            kind = "heavy diffusion" if heavy else "diffusion"
            raise QueueFull(f"all {lane.capacity} {kind} slots are busy")
        loop = asyncio.get_running_loop()
        lane.in_flight += 1
        self.in_flight += 1
        self._idle.clear()
        with self._admitted_lock:
            self._admitted[deadline] = False
        future = lane.submit(self._call, deadline, fn, *args)
        # Count the slot free when the thread is done, not when an awaiting request goes
        # away: a diffusion that cannot be interrupted still holds its worker.
        future.add_done_callback(lambda _: _soon(loop, self._release, lane, deadline))
        return await self._outcome(future, deadline)

    def _call(self, deadline: Deadline, fn: Callable[..., T], *args: Any) -> T:
        """In the worker: fn under the deadline, marked running while it runs."""
        with self._admitted_lock:
            self._admitted[deadline] = True
        with applied(deadline):
            deadline.check()  # it may have passed while the job waited for a worker
            return fn(*args)

    async def _outcome(self, future: concurrent.futures.Future[T], deadline: Deadline) -> T:
        waiting = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(
                asyncio.shield(waiting), max(deadline.remaining(), 0.0) + STOP_GRACE_S
            )
        except TimeoutError:
            raise DeadlineExceeded(
                f"the diffusion passed its deadline of {deadline.seconds:g} s and did not "
                "stop in time; its worker is reported by /healthz until it ends"
            ) from None
        except DeadlineExceeded as exc:
            if deadline.reason == SHUTDOWN:
                raise ShuttingDown(SHUTDOWN) from exc
            raise
        except asyncio.CancelledError:
            deadline.stop(CANCELLED)
            raise

    def _release(self, lane: _Lane, deadline: Deadline) -> None:
        lane.in_flight -= 1
        self.in_flight -= 1
        with self._admitted_lock:
            self._admitted.pop(deadline, None)
        if self.in_flight == 0:
            self._idle.set()

    def stuck(self) -> list[float]:
        """Seconds past their deadline of the jobs still running STOP_GRACE_S after it."""
        with self._admitted_lock:
            running = [d for d, started in self._admitted.items() if started]
        late = [-d.remaining() for d in running]
        return sorted((s for s in late if s > STOP_GRACE_S), reverse=True)

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting; let jobs finish, stopping any still running in `timeout_s` less
        the grace a kernel needs to notice."""
        self.accepting = False
        with self._admitted_lock:
            admitted = list(self._admitted)
        stop_at = time.monotonic() + max(timeout_s - STOP_GRACE_S, 0.0)
        for deadline in admitted:
            deadline.stop_by(stop_at, SHUTDOWN)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._light.close()
        self._heavy.close()
