"""The aiohttp middleware that holds requests to the HTTP limits (the agent's endpoint and
the coordinator's API; the decisions are in http_limits.py).

While a request is in progress its connection is marked busy (not to be evicted by the
connection caps); its body is reserved against the in-flight body budget before it is
read (past it: the app's 503 with Retry-After, the connection closed as its body is never
read); and a body still arriving slower than the minimum rate after the first second is
cut off (the connection aborted, 408).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dgdm.sync.http_limits import BodyBudget, ConnectionTable, body_too_slow

BODY_GRACE_S = 1.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class HttpGuard:
    """One server's limits: its connections, its body budget, the settings the middleware
    applies, `refused(reason)` counting each cut-off (slow_body, body_budget) and `busy()`
    the app's own 503 for a request over the budget (it names http.max_inflight_body_bytes)."""

    connections: ConnectionTable
    budget: BodyBudget
    max_body_bytes: int
    body_min_bytes_per_s: float
    refused: Callable[[str], None]
    busy: Callable[[], web.Response]

    def middleware(self) -> Any:
        @web.middleware
        async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            transport = request.transport
            self.connections.busy(transport)
            try:
                if not request.body_exists:
                    return await handler(request)
                return await self._with_body_budget(request, handler)
            finally:
                self.connections.idle(transport)

        return limits_middleware

    async def _with_body_budget(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # A body without a length may grow to the largest allowed: reserve that much.
        size = request.content_length
        size = self.max_body_bytes if size is None else min(size, self.max_body_bytes)
        if not self.budget.reserve(size):
            self.refused("body_budget")
            response = self.busy()
            response.force_close()  # its body is never read
            return response
        watch = _BodyWatch(request, self)
        try:
            return await handler(request)
        except Exception:
            if watch.closed:  # we cut it off: the read failed because of that
                return web.Response(status=408)
            raise
        finally:
            watch.cancel()
            self.budget.release(size)


class _BodyWatch:
    """Checks once a second that a body still arriving keeps the minimum rate."""

    def __init__(self, request: web.Request, guard: HttpGuard) -> None:
        self._request = request
        self._guard = guard
        self.closed = False
        self._handle: asyncio.TimerHandle | None = None
        if not request.content.is_eof():
            self._loop = asyncio.get_running_loop()
            self._start = self._loop.time()
            self._handle = self._loop.call_later(BODY_GRACE_S, self._tick)

    def _tick(self) -> None:
        content = self._request.content
        if content.is_eof():
            return
        elapsed = self._loop.time() - self._start
        min_rate = self._guard.body_min_bytes_per_s
        expected = self._request.content_length
        if body_too_slow(content.total_bytes, expected, elapsed, min_rate, BODY_GRACE_S):
            self.closed = True
            self._guard.refused("slow_body")
            transport = self._request.transport
            if transport is not None:
                transport.abort()
            return
        self._handle = self._loop.call_later(1.0, self._tick)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
