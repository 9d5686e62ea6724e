"""The agent service: starts the parts in order, runs them, and stops them within 10 s.

Start-up order: data dir -> diffusion engine -> keys and outbox -> HTTP endpoint -> MQTT
link -> monitors (TPU, telemetry, spool, broker, watchdog) -> READY=1. Diffusion runs in a
worker pool behind a bounded admission count (`work.WorkQueue`): a request that finds it
full is refused at once (HTTP 503 + Retry-After) instead of piling up. SIGTERM stops
admission, drains in-flight work, flushes telemetry into the outbox and closes everything;
SIGHUP reloads the settings in `config.RELOADABLE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dgdm.agent import anomaly_alerts, logs, monitors, remote, remote_config, spool, uplink
from dgdm.agent import status as state
from dgdm.agent.alerts import Alert, AlertPolicy, Alerts
from dgdm.agent.anomaly import LatencyDetector
from dgdm.agent.answers import result_body
from dgdm.agent.backup_cli import lock_path
from dgdm.agent.config import AgentConfig, load_config
from dgdm.agent.diffusion import EngineJobs, open_engine
from dgdm.agent.errors import AgentError, NoOutbox
from dgdm.agent.metrics import AgentMetrics
from dgdm.agent.reload import changed_settings, merge_reloadable
from dgdm.agent.sdnotify import Notifier
from dgdm.agent.serving_pool import ServingProcesses
from dgdm.agent.tally import AgentTally
from dgdm.agent.telemetry import LatencyWindow, TelemetryBatcher
from dgdm.agent.tpu import TpuMonitor
from dgdm.agent.watchers import eviction_alert
from dgdm.agent.work import GraphParser, WorkQueue
from dgdm.common import heap
from dgdm.common.errors import DgdmError
from dgdm.sync import datalock
from dgdm.sync.http_limits import BodyBudget, ConnectionTable, connection_cap, default_body_budget
from dgdm.sync.listener import memory_bytes

if TYPE_CHECKING:
    # Imported where they are first needed, at start-up: numpy, scipy and aiohttp load in
    # parallel with other start-up work (see start()).
    from aiohttp import web

    from dgdm.kernels.engine import DiffusionResult, Engine
    from dgdm.sync.crypto import LinkKeys
    from dgdm.sync.envelope import Kind
    from dgdm.sync.link import DeviceLink
    from dgdm.sync.listener import Listener
    from dgdm.sync.outbox import Outbox, OutboxStats

log = logging.getLogger("dgdm.agent")
STOP_BUDGET_S = 10.0
UNSENT_ALERTS = 100  # announced alerts waiting for room in the outbox (a full disk)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        # The file's (and env's) settings, under what the coordinator set (remote_config).
        self._file_config = config
        self.config_path = config_path
        self.env = env
        self._config_lock = asyncio.Lock()
        self.started_wall = time.time()
        self._started = time.monotonic()
        self.metrics = AgentMetrics()
        self.latency = LatencyWindow()
        self.tally = AgentTally(self)  # what OIP calls count, here and in serving processes
        self.notifier = Notifier(env)
        self.work, self.connections, self.body_budget = serving_bounds(config)
        self._parser = GraphParser()
        self.alerts = Alerts(
            AlertPolicy(config.alerts.repeat_s, config.alerts.max_per_minute), self._queue_alert
        )
        self.anomalies = LatencyDetector()
        self.monitors = monitors.Monitors(config, time.monotonic())
        self._engine: Engine | None = None
        self.jobs: EngineJobs | None = None
        self.outbox: Outbox | None = None
        self.keys: LinkKeys | None = None
        self.link: DeviceLink | None = None
        self.tpu: TpuMonitor | None = None
        self.telemetry: TelemetryBatcher | None = None
        self.http_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self.serving: ServingProcesses | None = None
        self._socket_dir: str | None = None  # the agent's socket for its serving processes
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._unsent_alerts: deque[Alert] = deque(maxlen=UNSENT_ALERTS)
        self._alerts_lock = asyncio.Lock()
        self._data_lock: IO[bytes] | None = None  # held while running: no restore meanwhile

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        try:
            await self.start()
            heap.freeze_after_start()
            await self._stop.wait()
        finally:
            await self.stop()
        return 0

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested")
            self._stop.set()

    async def start(self) -> None:
        from dgdm.sync.listener import quiet_accept_errors, raise_fd_limit

        self._loop = asyncio.get_running_loop()
        quiet_accept_errors(self._loop, log)
        fd_limit = raise_fd_limit(log)
        self.connections.max_total = connection_cap(self.config.http.max_connections, fd_limit)
        self.config.device.data_dir.mkdir(parents=True, exist_ok=True)
        self._data_lock = datalock.hold_shared(lock_path(self.config), "the agent")
        overlay = await asyncio.to_thread(remote_config.load, self._overlay_path())
        if overlay:
            self._apply_config(remote_config.apply(self._file_config, overlay))
        # The engine (numpy, scipy, TFLite imports and backend probes) loads in a thread
        # while this one imports and builds the HTTP app: both are needed before listening.
        engine = asyncio.create_task(asyncio.to_thread(self._open_engine))
        try:
            self.outbox, self.keys = await asyncio.to_thread(
                uplink.open_outbox, self.config, self._on_evict
            )
            await self._prepare_http()
        finally:
            await engine
        await self._listen()
        self._start_serving()
        await self._start_link()
        self._start_monitors()
        self._announce_ready()

    def _start_monitors(self) -> None:
        cfg = self.config
        self.tpu = TpuMonitor(
            self.alerts, self.engine.set_excluded, cfg.tpu.temperature_limit_c, cfg.tpu.hysteresis_c
        )
        self.telemetry = TelemetryBatcher(cfg.telemetry.batch_s)
        jobs = monitors.loops(self)
        if cfg.spool.dir is not None:
            jobs.append(spool.spool_loop(self, cfg.spool.dir))
        self._tasks.extend(asyncio.create_task(job) for job in jobs)

    def _announce_ready(self) -> None:
        http = f"{self.config.http.bind}:{self.http_port}"
        self.notifier.ready(f"serving on {http}, backend {self.active_backend()}")
        log.info(
            "agent ready",
            extra={
                "device_id": self.config.device.id,
                "http": http,
                "backend": self.active_backend(),
                "startup_s": round(self.uptime_s(), 3),
            },
        )

    async def stop(self) -> None:
        """Drain and close everything within STOP_BUDGET_S of the stop request."""
        deadline = time.monotonic() + STOP_BUDGET_S - 0.5

        def left(margin_s: float) -> float:
            return max(0.1, deadline - time.monotonic() - margin_s)

        self.notifier.stopping("draining")
        if self.serving is not None:  # theirs first: what they pass on is answered here
            await self.serving.stop(left(6.0))
        drained = await self.work.drain(left(2.0))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await monitors.flush_telemetry(self)
        if self._side_tasks:
            await asyncio.wait(set(self._side_tasks), timeout=left(1.5))
        if self.link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.link.stop(), left(1.0))
        await self._close_parts()
        log.info("agent stopped", extra={"drained": drained, "in_flight": self.work.in_flight})

    async def _close_parts(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self.work.close()
        await asyncio.to_thread(self._parser.close)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
        self.notifier.close()
        if self._data_lock is not None:
            self._data_lock.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        task.add_done_callback(_log_failure)

    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def engine(self) -> Engine:
        """The diffusion engine, open from before the HTTP endpoint listens."""
        assert self._engine is not None, "the engine is opened by start()"
        return self._engine

    def view(self) -> state.AgentView:
        """What /status, /metrics and the TPU view read, as of now."""
        return state.AgentView(
            config=self.config,
            engine=self.engine,
            work=self.work,
            outbox=self.outbox,
            link=self.link,
            tpu=self.tpu,
            latency=self.latency,
            alerts=self.alerts,
            loop_lag_s=self.monitors.loop_lag_s,
            uptime_s=self.uptime_s(),
            started_wall=self.started_wall,
            active_backend=self.active_backend(),
            http_connections=len(self.connections),
            http_serving=1 + (self.serving.serving if self.serving is not None else 0),
        )

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """/healthz and the watchdog's check: (healthy, each check)."""
        return await state.health(self.monitors.loop_lag_s, self.outbox, self.engine, self.work)

    # -- parts ----------------------------------------------------------------------------

    def _open_engine(self) -> None:
        engine, limits = open_engine(self.config)
        self._engine = engine
        self.jobs = EngineJobs(engine, limits, self.work, self._parser)

    async def _prepare_http(self) -> None:
        from aiohttp import web

        from dgdm.agent.http import make_app

        app = make_app(self)
        # keepalive_timeout also runs from a connection's opening and is not reset by data:
        # it is the header deadline, for a new connection as for an idle keep-alive one.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=2.0,
            keepalive_timeout=self.config.http.header_timeout_s,
        )
        await self._runner.setup()

    async def _listen(self) -> None:
        from dgdm.sync.listener import Listener

        http = self.config.http
        closed = self.metrics.http_refused
        server = self._runner.server if self._runner is not None else None
        assert server is not None, "_prepare_http() comes first"
        listener = Listener(server, self.connections, lambda reason: closed.labels(reason).inc())
        self._listener = listener
        shared = http.processes > 1
        try:
            self.http_port = await listener.start(http.bind, http.port, reuse_port=shared)
        except OSError as exc:
            raise AgentError(f"cannot listen on {http.bind}:{http.port}: {exc.strerror}") from exc
        if shared:
            self._socket_dir = tempfile.mkdtemp(prefix="dgdm-agent-")  # 0700
            await listener.start_unix(os.path.join(self._socket_dir, "http.sock"))

    def _start_serving(self) -> None:
        """http.processes - 1 more processes on the port, unless the Edge TPU serves: it is
        one device, opened here, and they would answer from the CPU instead."""
        count = self.config.http.processes - 1
        if count < 1 or self._socket_dir is None or self.http_port is None:
            return
        if self.active_backend() == "edgetpu":
            log.warning("http.processes ignored: the Edge TPU serves this agent's diffusions")
            return
        socket_path = os.path.join(self._socket_dir, "http.sock")
        self.serving = ServingProcesses(
            count, self.http_port, socket_path, self.config_path, self.tally
        )
        self.serving.start()

    async def _start_link(self) -> None:
        on_command = functools.partial(remote.on_command, self)
        self.link = uplink.make_link(
            self.config, self.outbox, self.keys, on_command, self.active_backend
        )
        if self.link is not None:
            await self.link.start()

    async def enqueue(self, kind: Kind, body: dict[str, Any]) -> int:
        """Durably queue a message and wake the sender so it goes out at once."""
        if self.link is not None:
            return await self.link.enqueue(kind, body)
        if self.outbox is None:
            raise NoOutbox("no outbox to queue in: set sync.coordinator_public_key")
        return await self.outbox.enqueue_async(kind, body)

    async def outbox_stats(self) -> OutboxStats | None:
        if self.outbox is None:
            return None
        return await asyncio.to_thread(self.outbox.stats)

    def active_backend(self) -> str:
        try:
            return self.engine.active_backend()
        except DgdmError:
            return "none"

    # -- work -----------------------------------------------------------------------------

    async def diffuse(
        self,
        source: str,
        data: bytes | dict[str, Any],
        *,
        queue: bool,
        deadline_s: float | None = None,
    ) -> tuple[DiffusionResult, int | None]:
        """Parse and diffuse a graph; optionally commit the result to the outbox."""
        self._check_outbox(queue)
        assert self.jobs is not None
        return await self._finish(await self.jobs.diffuse(data, deadline_s), source, queue)

    async def diffuse_registered(
        self,
        source: str,
        graph_id: str,
        data: bytes | dict[str, Any],
        *,
        queue: bool,
        deadline_s: float | None = None,
    ) -> tuple[DiffusionResult, int | None]:
        self._check_outbox(queue)
        assert self.jobs is not None
        result = await self.jobs.diffuse_registered(graph_id, data, deadline_s)
        anomaly_alerts.watch(self.anomalies, self.alerts, graph_id, result, time.monotonic())
        return await self._finish(result, source, queue)

    def _check_outbox(self, queue: bool) -> None:
        if queue and self.outbox is None:
            raise NoOutbox("queue=1 needs an outbox: set sync.coordinator_public_key")

    async def _finish(
        self, result: DiffusionResult, source: str, queue: bool
    ) -> tuple[DiffusionResult, int | None]:
        """Count the diffusion; queue its result message when asked (the outbox seq)."""
        self.latency.record(result.latency_ms)
        self.metrics.count_diffusion(result.backend, source, result.latency_ms / 1000.0)
        if not queue:
            return result, None
        from dgdm.sync.envelope import Kind

        return result, await self.enqueue(Kind.RESULT, result_body(result))

    # -- alerts ---------------------------------------------------------------------------

    def _on_evict(self, kind: Kind, count: int) -> None:
        """Called by the outbox writer thread: hop onto the loop."""
        alert = eviction_alert(kind, count)
        with contextlib.suppress(RuntimeError):  # the loop is already closed at shutdown
            self._loop.call_soon_threadsafe(self.alerts.condition, alert)

    def _queue_alert(self, alert: Alert) -> None:
        if self.outbox is None:
            self.metrics.alerts.labels(alert.code).inc()
            return
        if len(self._unsent_alerts) == self._unsent_alerts.maxlen:
            oldest = self._unsent_alerts[0].code
            log.error("alert dropped: too many waiting for the outbox", extra={"alert": oldest})
        self._unsent_alerts.append(alert)
        self._spawn(self.flush_alerts())

    async def flush_alerts(self) -> None:
        """Queue the announced alerts in order, each counted once stored. One the outbox
        refuses (a full disk) stays first in line and is retried at the next telemetry
        round, so a disk_low -> disk_ok episode reaches the coordinator whole."""
        from dgdm.sync.envelope import Kind

        async with self._alerts_lock:
            while self._unsent_alerts:
                alert = self._unsent_alerts[0]
                try:
                    await self.enqueue(Kind.ALERT, alert.body())
                except DgdmError as exc:
                    details = {"alert": alert.code, "error": str(exc)}
                    log.warning("alert not queued yet, retried later", extra=details)
                    return
                self._unsent_alerts.popleft()
                self.metrics.alerts.labels(alert.code).inc()

    # -- SIGHUP ---------------------------------------------------------------------------

    async def reload(self) -> None:
        async with self._config_lock:
            try:
                new = await asyncio.to_thread(load_config, self.config_path, self.env)
                overlay = await asyncio.to_thread(remote_config.load, self._overlay_path())
                running = remote_config.apply(new, overlay)
            except DgdmError as exc:
                details = {"error": str(exc)}
                log.error("reload refused, keeping the running config", extra=details)
                return
            self._file_config = new
            applied, ignored = self._apply_config(running)
            if self.serving is not None:
                self.serving.reload()  # they read the same file and overlay again
        log.info("config reloaded", extra={"applied": applied, "needs_restart": ignored})
        self.notifier.status(f"reloaded: {', '.join(applied) or 'nothing changed'}")

    async def set_config(self, args: Any) -> dict[str, Any]:
        """The `set_config` command: reloadable settings from the coordinator, checked
        whole, saved (they outlive a restart) and applied; `null` gives a key back to the
        file. Raises ConfigError naming the first bad key, changing nothing."""
        change = remote_config.parse(args)
        path = self._overlay_path()
        async with self._config_lock:
            saved = await asyncio.to_thread(remote_config.load, path)
            overlay = remote_config.merged(saved, change)
            running = remote_config.apply(self._file_config, overlay)
            await asyncio.to_thread(remote_config.save, path, overlay)
            applied, _ = self._apply_config(running)
            if self.serving is not None:
                self.serving.reload()
        values = {k: getattr(getattr(running, k.split(".")[0]), k.split(".")[1]) for k in change}
        log.info("config set by the coordinator", extra={"applied": applied})
        return {"applied": values, "changed": applied, "remote": overlay}

    def _overlay_path(self) -> Path:
        return remote_config.overlay_path(self._file_config)

    def _apply_config(self, new: AgentConfig) -> tuple[list[str], list[str]]:
        """Take the reloadable settings of `new`; returns (applied, needs restart)."""
        applied, ignored = changed_settings(self.config, new)
        self.config = merge_reloadable(self.config, new)
        logs.set_level(self.config.log.level)
        self.alerts.policy.repeat_s = self.config.alerts.repeat_s
        self.alerts.policy.max_per_minute = self.config.alerts.max_per_minute
        self.monitors.watchers.configure(self.config)
        return applied, ignored


def serving_bounds(config: AgentConfig) -> tuple[WorkQueue, ConnectionTable, BodyBudget]:
    """A serving process's bounds (the agent's, and each of its serving processes'): its
    diffusion workers and admission count, its connection table, its body budget."""
    k, http = config.kernels, config.http
    work = WorkQueue(
        k.workers, k.queue_size, heavy_workers=k.heavy_workers, deadline_s=k.deadline_s
    )
    connections = ConnectionTable(http.max_connections, http.max_connections_per_peer)
    budget = BodyBudget(
        http.max_inflight_body_bytes or default_body_budget(memory_bytes(), http.max_body_bytes)
    )
    return work, connections, budget


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background job failed", extra={"error": str(task.exception())})


async def serve(config: AgentConfig, config_path: Path | None) -> int:
    """Run the agent until SIGTERM/SIGINT; the `dgdm agent` entry point."""
    agent = Agent(config, config_path)
    return await agent.run()
