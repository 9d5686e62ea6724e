"""A listening socket with connection caps in front of aiohttp's protocol (the agent's
HTTP endpoint and the coordinator's API).

aiohttp accepts every connection and keeps it until its keep-alive timeout; this listener
asks `http_limits.ConnectionTable` first, so a new connection over a cap closes the longest-idle
one of its scope (or is itself closed at once when all are busy). The descriptors the caps
leave are made available up front (the soft RLIMIT_NOFILE raised to the hard one), and
asyncio's "accept() out of system resource" error, which it reports on every failed
accept, is logged at most once per 10 s with a count.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from dgdm.sync.http_limits import ACCEPT_BACKLOG, ConnectionTable
from dgdm.sync.repeat_limiter import RepeatLimiter

ACCEPT_LOG_PERIOD_S = 10.0
_ACCEPT_FAILED = "socket.accept() out of system resource"


class GuardedProtocol(asyncio.Protocol):
    """Admits a connection through the table, then hands every event to aiohttp's own
    protocol (made only for admitted connections)."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._listener.admit(transport):
            self._inner = self._listener.make_protocol()
            self._inner.connection_made(transport)
        else:
            transport.abort()  # type: ignore[attr-defined]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._listener.table.remove(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class Listener:
    def __init__(
        self,
        make_protocol: Callable[[], asyncio.Protocol],
        table: ConnectionTable,
        on_close: Callable[[str], None],
    ) -> None:
        self.make_protocol = make_protocol
        self.table = table
        self._on_close = on_close  # counts each connection closed by a cap, by reason
        self._server: asyncio.Server | None = None
        self._servers: list[asyncio.Server] = []

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        # Every local process is the same loopback peer: only the total cap applies to it.
        peer = _peer(transport)
        admitted, victim = self.table.admit(transport, None if _is_loopback(peer) else peer)
        if victim is not None:
            self._on_close("evicted_idle")
            victim.abort()  # type: ignore[attr-defined]  # keys are transports
        if not admitted:
            self._on_close("refused_all_busy")
        return admitted

    async def start(
        self, host: str, port: int, backlog: int = ACCEPT_BACKLOG, *, reuse_port: bool = False
    ) -> int:
        """Listen on host:port (0: a free one), shared with other processes that listen with
        `reuse_port` too (the kernel spreads new connections across them); the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: GuardedProtocol(self),
            host,
            port,
            backlog=backlog,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str, backlog: int = ACCEPT_BACKLOG) -> None:
        """Listen on a unix socket too (the agent's serving processes pass requests on)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: GuardedProtocol(self), path, backlog=backlog)
        os.chmod(path, 0o600)
        self._servers.append(server)

    def close(self) -> None:
        """Stop accepting; open connections are closed by aiohttp's shutdown."""
        if self._server is not None:
            self._server.close()
        for server in self._servers:
            server.close()


def _is_loopback(peer: str) -> bool:
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return peer == "unix"


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    sock = transport.get_extra_info("socket")
    return "unix" if sock is not None and sock.family == socket.AF_UNIX else "?"


def raise_fd_limit(log: logging.Logger) -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (systemd units set both); the soft
    limit in force. A refusal (a unit's seccomp filter) is logged on `log`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit", extra={"error": str(exc)})
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def memory_bytes() -> int | None:
    """The box's physical memory (the default body budget is sized from it)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, log: logging.Logger) -> None:
    """asyncio reports every accept() that fails for lack of descriptors or memory; one
    line on `log` per ACCEPT_LOG_PERIOD_S (with how many were held back) is enough."""
    limiter = RepeatLimiter(period_s=ACCEPT_LOG_PERIOD_S, max_keys=1)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_FAILED:
            loop.default_exception_handler(context)
            return
        held_back = limiter.allow("accept", time.monotonic())
        if held_back is not None:
            error = str(context.get("exception", ""))
            log.error(_ACCEPT_FAILED, extra={"error": error, "suppressed": held_back})

    loop.set_exception_handler(handler)
