"""A serving process (`http.processes` > 1): one more event loop on the agent's port.

The agent starts `processes - 1` of these once it listens (agent/serving_pool.py). Each
listens on the same address with SO_REUSEPORT, so the kernel spreads new connections
across them and the agent. A serving process answers the Open Inference Protocol's model
and infer routes itself, from the topologies registered in the agent's `kernels.cache_dir`
(it follows the index the agent rewrites on every change before answering it), with its
own batcher and diffusion workers, behind the same checks as the agent (limits, Host,
token). Everything else, and an infer that asks to queue, it passes on to the agent over
a unix socket (agent/http_proxy.py). Its counts go to the agent as a JSON line a second on
stdout (agent/tally.py). It stops on SIGTERM or when its stdin closes (the agent is gone);
SIGHUP re-reads the settings a SIGHUP changes in the agent.

Run by the agent as `python -m dgdm.agent.serving --port P --socket S [--config F]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgdm.agent import logs, remote_config
from dgdm.agent.config import AgentConfig, load_config, validate
from dgdm.agent.errors import NoOutbox
from dgdm.agent.metrics import AgentMetrics
from dgdm.agent.reload import merge_reloadable
from dgdm.agent.runtime import serving_bounds
from dgdm.agent.tally import ForwardTally
from dgdm.common import heap
from dgdm.common.errors import DgdmError
from dgdm.sync.http_limits import connection_cap

if TYPE_CHECKING:
    from aiohttp import web

    from dgdm.agent.http_proxy import AgentProxy
    from dgdm.kernels.engine import Engine
    from dgdm.sync.envelope import Kind

log = logging.getLogger("dgdm.agent.serving")
REPORT_EVERY_S = 1.0
STOP_BUDGET_S = 3.0
# The agent answers these itself: they read its state (health) or change it.
_AGENTS_ROUTES = frozenset({"/v2/health/ready"})


class ServingHost:
    """What the guarded app and the OIP routes use here (agent/http.py HttpHost and
    agent/oip.py OipHost): this process's config, engine, workers and limits."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()  # the middlewares' own figures, never shown
        self.tally = ForwardTally()
        self.work, self.connections, self.body_budget = serving_bounds(config)
        self.outbox = None  # a request to queue is passed on to the agent first
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "open_engine() comes first"
        return self._engine

    def open_engine(self) -> None:
        from dgdm.agent.diffusion import open_engine

        engine, _ = open_engine(self.config)
        engine.set_excluded({"edgetpu"})  # the agent's alone (it starts none beside it)
        self._engine = engine

    async def enqueue(self, kind: Kind, body: dict[str, Any]) -> int:
        raise NoOutbox("a serving process has no outbox: the agent queues")

    async def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {}  # /v2/health/ready is the agent's (_AGENTS_ROUTES)


def serving_app(host: ServingHost, proxy: AgentProxy) -> web.Application:
    from aiohttp import web

    from dgdm.agent import oip
    from dgdm.agent.http import guarded_app

    async def pass_on(request: web.Request) -> web.StreamResponse:
        return await proxy.forward(request)

    app = guarded_app(host)
    own = tuple(r for r in oip.ROUTES if r.path not in _AGENTS_ROUTES)
    oip.add_oip_routes(
        app, host, follow=host.engine.follow_registry, forward=proxy.forward, routes=own
    )
    app.add_routes([web.route("*", "/{tail:.*}", pass_on)])  # last: what no route above takes
    return app


def effective_config(path: Path | None) -> AgentConfig:
    """The config file (and environment) under what the coordinator set, as the agent's."""
    config = load_config(path)
    validate(config)
    overlay = remote_config.load(remote_config.overlay_path(config))
    return remote_config.apply(config, overlay) if overlay else config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgdm.agent.serving")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    try:
        config = effective_config(args.config)
    except DgdmError as exc:
        print(f"dgdm serving process: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log.level)
    try:
        return asyncio.run(_serve(config, args))
    except (DgdmError, OSError) as exc:  # the engine, or the port: the agent starts another
        log.error("serving process failed", extra={"error": str(exc)})
        return 1


async def _serve(config: AgentConfig, args: argparse.Namespace) -> int:
    from aiohttp import web

    from dgdm.agent.http_proxy import AgentProxy
    from dgdm.sync.listener import Listener, quiet_accept_errors, raise_fd_limit

    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop, log)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = ServingHost(config)
    host.connections.max_total = connection_cap(config.http.max_connections, raise_fd_limit(log))
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(host, args.config))
    await asyncio.to_thread(host.open_engine)
    proxy = AgentProxy(args.socket)
    await proxy.start()
    runner = web.AppRunner(
        serving_app(host, proxy),
        access_log=None,
        shutdown_timeout=2.0,
        keepalive_timeout=config.http.header_timeout_s,
    )
    await runner.setup()
    assert runner.server is not None
    listener = Listener(runner.server, host.connections, host.tally.refused)
    await listener.start(config.http.bind, args.port, reuse_port=True)
    await _watch_stdin(stop)
    _say({"event": "listening", "pid": os.getpid()})
    heap.freeze_after_start()
    reports = asyncio.create_task(_report_every(host.tally, REPORT_EVERY_S))
    try:
        await stop.wait()
    finally:
        listener.close()
        await host.work.drain(STOP_BUDGET_S / 2)
        await runner.cleanup()
        reports.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reports
        _report(host.tally)
        await proxy.close()
        host.work.close()
        await asyncio.to_thread(host.engine.close)
    return 0


def _reload(host: ServingHost, path: Path | None) -> None:
    try:
        new = effective_config(path)
    except DgdmError as exc:
        log.error("reload refused, keeping the running config", extra={"error": str(exc)})
        return
    host.config = merge_reloadable(host.config, new)
    logs.set_level(host.config.log.level)


async def _watch_stdin(stop: asyncio.Event) -> None:
    """The agent holds this process's stdin: its end (the agent gone) stops it."""
    loop = asyncio.get_running_loop()

    class _Eof(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            stop.set()

    await loop.connect_read_pipe(_Eof, sys.stdin)


async def _report_every(tally: ForwardTally, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        _report(tally)


def _report(tally: ForwardTally) -> None:
    report = tally.report()
    if report is not None:
        _say({"event": "tally", **report})


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
