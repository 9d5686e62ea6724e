"""Where blocking work runs: a bounded worker pool, and a parser process for large bodies.

`WorkQueue` admits at most `workers + queue_size` jobs (running + waiting): a job that finds
it full is refused at once (`QueueFull`, HTTP 503 + Retry-After) instead of piling up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from dgdm.agent.errors import BadJson, QueueFull, ShuttingDown
from dgdm.agent.jsonio import loads
from dgdm.kernels.errors import GraphError

T = TypeVar("T")


def parse_graph_body(data: bytes | str | dict[str, Any], limits: Any) -> Any:
    from dgdm.kernels.graph import parse_graph, parse_graph_bytes

    if isinstance(data, bytes):
        return parse_graph_bytes(data, loads, limits)
    return parse_graph(loads(data) if isinstance(data, str) else data, limits)


def _parse_in_child(data: bytes, limits: Any) -> tuple[str, Any]:
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

    def parse(self, data: bytes, limits: Any) -> Any:
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


class WorkQueue:
    """A worker pool that admits at most `capacity` jobs (running + waiting)."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="dgdm-work"
        )
        self.capacity = workers + queue_size
        self.in_flight = 0
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the agent is shutting down")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self.check_accepting()
        if self.in_flight >= self.capacity:
            raise QueueFull(f"all {self.capacity} diffusion slots are busy")
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        self._idle.clear()
        future = self._executor.submit(fn, *args)
        # Count the slot free when the thread is done, not when an awaiting request goes
        # away: a cancelled request does not stop a running diffusion.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
