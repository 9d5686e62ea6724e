"""The device side of the sync link: outbox -> MQTT, receipts and commands back.

`DeviceLink` drains the outbox most urgent first, pipelined through the transport's
bounded window (never one round trip per message); only a coordinator receipt deletes a
message, and the decisions of what to send and resend live in `link_state.SendState`.
Commands are decrypted, checked (key id, device, ttl, replay) and executed at most once:
the seq is persisted before `on_command` runs; the reply is queued in the outbox (kind 17).
TTLs are judged on the coordinator's clock as estimated from receipts (clock.py, SPEC
§6.1), so a device whose wall clock is an hour off neither drops nor keeps commands for it;
every timeout and interval here runs on the monotonic clock, so a wall-clock step stalls
nothing.
A retained `status` says online at every connect; the will (and a clean stop) says offline.
The link also follows the coordinators' presence (presence.py) and resends what may have
reached nobody when one (re)appears after a broker lost its sessions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dgdm.sync import presence
from dgdm.sync.clock import ClockOffset
from dgdm.sync.crypto import LinkKeys
from dgdm.sync.envelope import (
    FLAG_ENCRYPTED,
    Envelope,
    Kind,
    check_command,
    open_envelope,
    receipt_ranges,
)
from dgdm.sync.errors import EnvelopeError, OutboxError, TransportError
from dgdm.sync.link_state import Cursor, ExecutedCommands, ReadPlan, SendState
from dgdm.sync.mqtt import MqttClient, MqttOptions, Will
from dgdm.sync.outbox import Outbox, OutboxMessage
from dgdm.sync.replies import reply_body
from dgdm.sync.topics import STATUS, device_topic, kind_topic
from dgdm.sync.wallclock import now_ms

log = logging.getLogger(__name__)

# The executed command seqs (ExecutedCommands.encode; an older agent kept the last one).
LAST_COMMAND_KEY = "last_command_seq"
PAGE_SIZE = 500
IDLE_POLL_S = 0.25
TICK_S = 1.0

CommandHandler = Callable[[int, dict[str, Any]], Awaitable[Any]]


def status_payload(state: str, agent_version: str, backend: str) -> bytes:
    """The plain JSON of the retained status topic (SPEC §5)."""
    body = {"state": state, "ts_ms": now_ms(), "agent_version": agent_version, "backend": backend}
    return json.dumps(body, separators=(",", ":")).encode()


class DeviceLink:
    def __init__(
        self,
        outbox: Outbox,
        options: MqttOptions,
        *,
        device_id: str,
        keys: LinkKeys,
        on_command: CommandHandler | None = None,
        agent_version: str = "",
        backend: Callable[[], str] | str = "",
        receipt_timeout_s: float = 60.0,
        max_unreceipted: int = 20_000,
        page_size: int = PAGE_SIZE,
        wall_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.outbox = outbox
        self._wall_ms = wall_ms  # the device's wall clock (tests step it)
        self.device_id = device_id
        self.keys = keys
        self.on_command = on_command
        self.agent_version = agent_version
        self._backend = backend
        self.page_size = page_size
        self._topics = {kind: kind_topic(device_id, kind) for kind in Kind}
        self.state = SendState(receipt_timeout_s, max_unreceipted)
        self.clock = ClockOffset()
        will = Will(self._topic(STATUS), status_payload("offline", agent_version, self.backend))
        self.presence = presence.PresenceView()
        self.mqtt = MqttClient(
            _with_will(options, will),
            on_message=self._on_message,
            on_retained=self._on_retained,
            on_connect=self._on_connect,
            subscriptions=(
                (self._topic("cmd"), 1),
                (self._topic("receipt"), 1),
                (presence.FILTER, 1),
            ),
        )
        self.last_sync_ms: int | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._wake = asyncio.Event()
        self._commands: asyncio.Queue[Envelope] = asyncio.Queue()
        self._executed = ExecutedCommands()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    # -- public API --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    @property
    def backend(self) -> str:
        return self._backend() if callable(self._backend) else self._backend

    async def start(self) -> None:
        stored = await asyncio.to_thread(self.outbox.get_state, LAST_COMMAND_KEY)
        self._executed = ExecutedCommands.decode(stored)
        await self._answer_interrupted()
        await self.mqtt.start()
        self._tasks = [
            asyncio.create_task(self._drain_forever(), name="link-drain"),
            asyncio.create_task(self._run_commands(), name="link-commands"),
        ]

    async def stop(self) -> None:
        """Say offline (retained), disconnect cleanly and stop."""
        if self.connected:
            with contextlib.suppress(TransportError, asyncio.TimeoutError):
                fut = await self._publish_status("offline")
                await asyncio.wait_for(fut, 2.0)
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.mqtt.stop()

    def wake(self) -> None:
        """Call after enqueueing: a more urgent message then jumps ahead at once."""
        self._wake.set()

    async def enqueue(self, kind: Kind, body: Any) -> int:
        """Durably queue a message (sealed and committed by the outbox's writer, grouped with
        other producers) and wake the sender."""
        seq = await self.outbox.enqueue_async(kind, body)
        self.wake()
        return seq

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "last_sync_ms": self.last_sync_ms,
            "unreceipted": self.state.unreceipted,
            "sent": self.state.sent_total,
            "resent": self.state.resent_total,
            "window": self.mqtt.window,
            "pubacks": self.mqtt.acked,
            "wire": self.mqtt.active_wire,
            "coordinators_online": len(self.presence.online),
            "clock_skew_ms": self.clock_skew_ms(),
            **dict(self.counters),
        }

    def coordinator_now_ms(self) -> int:
        """Now on the coordinator's clock as estimated, or the own clock before a receipt."""
        return self.clock.now_ms(self._wall_ms(), time.monotonic())

    def coordinator_ms(self, mono: float) -> int | None:
        """Monotonic `mono` on the coordinator's clock, or None before the first receipt."""
        return self.clock.coordinator_ms(mono)

    def clock_skew_ms(self) -> int | None:
        """How far the wall clock is behind (+) or ahead (-) of the coordinator's."""
        return self.clock.skew_ms(self._wall_ms(), time.monotonic())

    # -- connection ----------------------------------------------------------------------

    def _topic(self, suffix: str) -> str:
        return device_topic(self.device_id, suffix)

    async def _on_connect(self, session_present: bool) -> None:
        self.state.reconnected()
        self.presence.connected()
        self._wake.set()
        self._spawn(self._publish_status("online"))

    async def _publish_status(self, state: str) -> asyncio.Future[None]:
        payload = status_payload(state, self.agent_version, self.backend)
        return await self.mqtt.publish(self._topic(STATUS), payload, retain=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    # -- draining --------------------------------------------------------------------------

    async def _drain_forever(self) -> None:
        while True:
            try:
                await self.mqtt.wait_connected()
                await self._drain()
            except TransportError as exc:
                log.debug("link drain paused: %s", exc)
            except OutboxError as exc:
                log.warning("outbox read failed: %s", exc)
                await asyncio.sleep(TICK_S)

    async def _drain(self) -> None:
        last_tick = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last_tick >= TICK_S:
                last_tick = now
                late, gaps = self.state.expire(now)
                self.counters["receipt_timeouts"] += late
                self.counters["gap_resends"] += gaps
            if self.state.window_full():
                self._wake.clear()
                await self._wait_for_news()
                continue
            # Cleared before the read: whatever is queued from now on wakes the wait below.
            self._wake.clear()
            plan = self.state.plan()
            urgent, page = await asyncio.to_thread(self._read, plan)
            if urgent is not None:
                if self.state.is_new_urgent(*urgent):
                    self.state.rewind(*urgent)
                continue
            await self._send_page(page, plan.generation)
            if len(page) < self.page_size:  # caught up with the outbox
                await self._wait_for_news()

    def _read(self, plan: ReadPlan) -> tuple[Cursor | None, list[OutboxMessage]]:
        """In a worker thread, one hop per turn: a message queued since the cursor passed its
        (more urgent) tier, which goes next; otherwise the next page after the cursor."""
        urgent = plan.find_urgent(self._first_after)
        if urgent is not None:
            return urgent, []
        return None, self.outbox.pending(self.page_size, plan.cursor)

    def _first_after(self, cursor: Cursor) -> Cursor | None:
        rows = self.outbox.pending(1, cursor)
        return (rows[0].priority, rows[0].seq) if rows else None

    async def _send_page(self, page: list[OutboxMessage], generation: int) -> None:
        for msg in page:
            if self.state.generation != generation or self.state.window_full():
                return
            if self.state.should_send(msg.seq):
                if _is_plaintext(msg.payload):
                    await self._send_plaintext(msg)
                else:
                    # No future per message: a PUBACK changes nothing here (SPEC §5).
                    await self.mqtt.send(self._topics[msg.kind], msg.payload)
                self.state.mark_sent(msg.priority, msg.seq, time.monotonic(), msg.kind)
            if not self.state.advance(msg.priority, msg.seq, generation):
                return

    async def _send_plaintext(self, msg: OutboxMessage) -> None:
        """Plaintext telemetry (`sync.encrypt_telemetry = false`) is never receipted: only a
        sealed envelope may advance receipts, since anyone on the path could have written a
        plaintext one (SECURITY.md). Its broker PUBACK is as far as it is acknowledged, so
        it leaves the outbox then, as a receipt would have taken it."""
        acked = await self.mqtt.publish(self._topics[msg.kind], msg.payload)

        def done(fut: asyncio.Future[None], seq: int = msg.seq) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.state.receipted([(seq, seq)], time.monotonic())
                self._spawn(self._apply_receipt([(seq, seq)]))

        acked.add_done_callback(done)

    async def _wait_for_news(self) -> None:
        """Until something is queued, a receipt frees a full window, a reconnect, or the
        poll interval (receipt timeouts are checked at least that often)."""
        if not self._wake.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)

    # -- incoming ---------------------------------------------------------------------------

    def _on_retained(self, topic: str, payload: bytes) -> None:
        if topic.startswith(presence.PREFIX + "/"):
            self._on_presence(topic, payload, retained=True)
        else:
            self._on_message(topic, payload)

    def _on_presence(self, topic: str, payload: bytes, *, retained: bool) -> None:
        seen = presence.parse(topic, payload)
        if seen is None:
            if payload:  # an empty one is a presence cleared by an operator
                self._reject("bad_presence", topic, "not a coordinator presence")
            return
        if self.presence.observe(seen, retained):
            log.info(
                "coordinator %s is %s (incarnation %s): resending what may have reached nobody",
                seen.coordinator_id,
                seen.state,
                seen.incarnation,
            )
            self._spawn(self._resend_lost(time.monotonic()))

    async def _resend_lost(self, seen_at: float) -> None:
        """After 0-2 s (a fleet must not resend in the same millisecond), what was sent
        before the coordinator appeared and is still unreceipted goes again, through the
        window and the bandwidth cap like any send."""
        await asyncio.sleep(presence.resend_delay())
        self.counters["presence_resends"] += self.state.presumed_lost(seen_at)
        self._wake.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.startswith(presence.PREFIX + "/"):
            self._on_presence(topic, payload, retained=False)
            return
        suffix = topic.rsplit("/", 1)[-1]
        try:
            env = open_envelope(
                payload,
                key=self.keys.down,
                key_id=self.keys.key_id,
                expected_device=self.device_id,
            )
        except EnvelopeError as exc:
            self._reject(exc.reason, topic, str(exc))
            return
        if suffix == "receipt" and env.header.kind is Kind.RECEIPT:
            self._on_receipt(env)
        elif suffix == "cmd" and env.header.kind is Kind.COMMAND:
            self._commands.put_nowait(env)
        else:
            self._reject("bad_kind", topic, f"{env.header.kind.name.lower()} on {suffix}")

    def _reject(self, reason: str, topic: str, message: str) -> None:
        self.counters[f"rejected_{reason}"] += 1
        log.warning("dropped envelope on %s: %s (%s)", topic, reason, message)

    def _on_receipt(self, env: Envelope) -> None:
        try:
            ranges = receipt_ranges(env.body)
        except EnvelopeError as exc:
            self._reject(exc.reason, "receipt", str(exc))
            return
        was_full = self.state.window_full()
        now = time.monotonic()
        sent = self.state.first_send_covered(ranges)
        if sent is not None:
            self.clock.observe(env.header.created_ms, sent, now)
        self.state.receipted(ranges, now)
        if was_full and not self.state.window_full():
            self._wake.set()
        self.counters["receipts"] += 1
        self.last_sync_ms = now_ms()
        self._spawn(self._apply_receipt(ranges))

    async def _apply_receipt(self, ranges: list[tuple[int, int]]) -> None:
        deleted = await asyncio.to_thread(self.outbox.apply_receipt, ranges)
        self.counters["receipted"] += deleted

    # -- commands ----------------------------------------------------------------------------

    async def _run_commands(self) -> None:
        """One at a time, in arrival order, so seqs execute in order and at most once."""
        while True:
            env = await self._commands.get()
            try:
                await self._execute(env)
            except OutboxError as exc:
                log.warning("command reply could not be queued: %s", exc)

    async def _execute(self, env: Envelope) -> None:
        try:
            check_command(env, self.coordinator_now_ms(), self._executed.seen)
        except EnvelopeError as exc:
            self._reject(exc.reason, "cmd", str(exc))
            return
        seq = env.header.seq
        # Persist first: a crash while executing must not run the command again (it is
        # answered as interrupted at the next start instead).
        await self._save_executed(self._executed.start(seq))
        self.counters["commands"] += 1
        reply = await self._call_handler(seq, env.body)
        await self.enqueue(Kind.REPLY, reply)
        await self._save_executed(self._executed.replied())

    async def _answer_interrupted(self) -> None:
        """A command that started before a crash and has no reply queued gets one now."""
        seq = self._executed.running
        if seq is None:
            return
        log.warning("command %s was interrupted by a stop; answered, not run again", seq)
        error = "interrupted: the agent stopped while running it (it is not run again)"
        await self.enqueue(Kind.REPLY, reply_body(seq, error=error))
        await self._save_executed(self._executed.replied())

    async def _save_executed(self, executed: ExecutedCommands) -> None:
        await asyncio.to_thread(self.outbox.set_state, LAST_COMMAND_KEY, executed.encode())
        self._executed = executed

    async def _call_handler(self, seq: int, body: dict[str, Any]) -> dict[str, Any]:
        if self.on_command is None:
            return reply_body(seq, error="this device takes no commands")
        try:
            result = await self.on_command(seq, body)
        except Exception as exc:  # noqa: BLE001 - the reply carries the failure; the link goes on
            log.warning("command %s (%s) failed: %s", seq, body.get("cmd"), exc)
            return reply_body(seq, error=str(exc) or type(exc).__name__)
        if isinstance(result, dict) and "ok" in result:
            return {**reply_body(seq), **result, "cmd_seq": seq}
        return reply_body(seq, result)


def _with_will(options: MqttOptions, will: Will) -> MqttOptions:
    return dataclasses.replace(options, will=will)


def _is_plaintext(payload: bytes) -> bool:
    """SPEC §6 header: flags at offset 3, bit 0 set when the body is encrypted."""
    return len(payload) > 3 and not payload[3] & FLAG_ENCRYPTED


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if not isinstance(exc, TransportError):
            log.error("link task failed: %r", exc)
