"""MQTT transport: paho-mqtt 2.x driven by the asyncio loop, with no paho thread.

paho does the protocol; the event loop does the I/O (`add_reader`/`add_writer` on paho's
socket and `loop_misc()` on a timer for keepalive), as in aiomqtt v2 and Home Assistant.
`publish()` waits for room in a bounded in-flight window (never more than the broker's
MQTT 5 Receive Maximum) and for the bandwidth cap, then returns a future that resolves on
the PUBACK: callers pipeline many publishes and await the acknowledgements as they come.
`send()` is the same without the future, for a sender that learns of delivery some other
way (the device link: only a coordinator receipt counts). The packets move through a wire
(mqtt_wire.py): stock paho, or the lean wire that handles PUBLISH and PUBACK itself
(`MqttOptions.wire`, the `wire` config key; lean where this paho has its hooks).

Each connection gets a fresh paho client. The session lives on at the broker (clean start
off, a session expiry interval); what this side has not seen acknowledged is failed with
`TransportError` at a disconnect, and the layer above (the outbox) decides what to resend.
The reconnect policy (`Backoff`) and the bandwidth cap (`TokenBucket`) are pure and take
time as an argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from dgdm.sync.errors import ConfigError, TransportError
from dgdm.sync.mqtt_wire import LeanWire, PahoWire, Wire, bind_callbacks, lean_wire_supported

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MQTT5_MAX_RECEIVE = 65535
MISC_INTERVAL_S = 1.0
DRAIN_POLL_S = 0.01
FAILURE_REASON = 0x80  # MQTT 5 reason codes from 0x80 up are failures
# CONNACK codes saying the broker does not take this protocol version: MQTT 5's
# "Unsupported Protocol Version", and 3.1.1's "unacceptable protocol version" (what a 3.1.1
# broker answers an MQTT 5 CONNECT with, if it answers at all).
UNSUPPORTED_PROTOCOL = (0x84, 0x01)
NOT_MQTT5_HINT = (
    'the broker may not speak MQTT 5: set mqtt_version = "3.1.1"'
    " (sync.mqtt_version on an agent, mqtt.mqtt_version on a coordinator)"
)


@dataclasses.dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclasses.dataclass(frozen=True)
class MqttOptions:
    """Everything needed to connect. `url` is ``mqtt://host[:port]`` or ``mqtts://...``."""

    url: str
    client_id: str
    mqtt_version: str = "5"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    will: Will | None = None
    max_inflight: int = 500
    bandwidth_bytes_per_s: int = 0
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    wire: Literal["lean", "paho"] = "lean"


def options_from_settings(section: Any, client_id: str, **overrides: Any) -> MqttOptions:
    """MqttOptions from a settings section with the SPEC §7 key names (agent `[sync]`,
    coordinator `[mqtt]`): broker_url, ca_file, cert_file, key_file, username, password,
    mqtt_version and, when present, bandwidth_bytes_per_s, session_expiry_s and wire."""
    if not section.broker_url:
        raise ConfigError("sync.broker_url", "is required to connect to a broker")
    values: dict[str, Any] = {
        "url": section.broker_url,
        "client_id": client_id,
        "mqtt_version": section.mqtt_version,
        "ca_file": section.ca_file,
        "cert_file": section.cert_file,
        "key_file": section.key_file,
        "username": section.username,
        "password": section.password,
        "bandwidth_bytes_per_s": getattr(section, "bandwidth_bytes_per_s", 0),
        "session_expiry_s": getattr(section, "session_expiry_s", MqttOptions.session_expiry_s),
        "wire": getattr(section, "wire", MqttOptions.wire),
    }
    values.update(overrides)
    return MqttOptions(**values)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> Endpoint:
    """``mqtt://host:1883`` or ``mqtts://host:8883`` -> Endpoint; anything else is a ConfigError."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError("sync.broker_url", f"{url!r} is not mqtt://host[:port] or mqtts://...")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ConfigError("sync.broker_url", f"{url!r} has an invalid port") from exc
    return Endpoint(parts.hostname, port, parts.scheme == "mqtts")


class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform in [0, min(cap, b*2^n)]."""

    def __init__(self, initial_s: float, maximum_s: float, rng: random.Random | None = None):
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next_delay(self) -> float:
        ceiling = min(self.maximum_s, self.initial_s * 2.0 ** min(self.attempt, 62))
        self.attempt += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class TokenBucket:
    """A bytes/s cap. `reserve` takes the bytes now and says how long to wait before sending.

    The bucket holds at most one second of rate (the burst); a message bigger than that is
    let through once the bucket is full, so a cap below the message size still makes progress.
    """

    def __init__(self, rate_bytes_per_s: float, now: float) -> None:
        self.rate = float(rate_bytes_per_s)
        self.capacity = self.rate
        self.tokens = self.capacity
        self.stamp = now

    def reserve(self, nbytes: int, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(nbytes, self.capacity)
        wait = max(0.0, (need - self.tokens) / self.rate)
        self.tokens -= nbytes
        return wait


MessageHandler = Callable[[str, bytes], None]
ConnectHandler = Callable[[bool], Awaitable[None] | None]


class _Connection:
    """One paho client, its wire, window and unacknowledged publishes (mid -> the future
    `publish()` returned, or None for `send()`)."""

    def __init__(self, client: paho.Client, window: int) -> None:
        self.client = client
        self.window = window
        self.slots = asyncio.Semaphore(window)
        self.pending: dict[int, asyncio.Future[None] | None] = {}
        self.closed = asyncio.Event()
        self.connack: asyncio.Future[tuple[bool, int]] | None = None
        self.misc_task: asyncio.Task[None] | None = None
        self.wire: Wire | None = None

    def fail_pending(self, reason: str) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            self.slots.release()
            if fut is not None:
                _fail(fut, TransportError(reason))


def _fail(fut: asyncio.Future[Any], exc: TransportError) -> None:
    """A pipelined sender may never await a publish that failed (the loss itself is logged
    and counted), so the exception is marked as seen; awaiting callers still get it."""
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()


class MqttClient:
    """A reconnecting MQTT client. `start()`, then `publish()`; incoming messages go to
    `on_message(topic, payload)` (called on the loop, so it must not block).

    `subscriptions` are (topic filter, qos) pairs subscribed at every connect;
    `on_connect(session_present)` runs after that (e.g. to publish a retained status).
    `on_retained`, when given, gets the messages the broker sends from its retained store
    (RETAIN set on delivery: the state as of our subscribe) instead of `on_message`.
    """

    def __init__(
        self,
        options: MqttOptions,
        *,
        on_message: MessageHandler | None = None,
        on_connect: ConnectHandler | None = None,
        on_retained: MessageHandler | None = None,
        subscriptions: tuple[tuple[str, int], ...] = (),
    ) -> None:
        if options.mqtt_version not in ("5", "3.1.1"):
            raise ConfigError("sync.mqtt_version", "must be '5' or '3.1.1'")
        if options.wire not in ("lean", "paho"):
            raise ConfigError("sync.wire", "must be 'lean' or 'paho'")
        self.options = options
        self.endpoint = parse_broker_url(options.url)
        self.subscriptions = subscriptions
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_retained = on_retained
        self._reading_paused = False
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._bucket: TokenBucket | None = None
        self.backoff = Backoff(options.backoff_initial_s, options.backoff_max_s)
        self.connects = 0
        self.disconnects = 0
        self.last_error: str | None = None
        self.receive_maximum = MQTT5_MAX_RECEIVE
        self.acked = 0  # QoS 1 publishes the broker acknowledged
        self.rejected = 0  # ... and refused (a failure reason code)

    # -- public API --------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def window(self) -> int:
        return self._conn.window if self._conn else 0

    @property
    def inflight(self) -> int:
        return len(self._conn.pending) if self._conn else 0

    @property
    def active_wire(self) -> str:
        """The wire in use: `options.wire`, or "paho" when this paho lacks the lean hooks."""
        return "lean" if self.options.wire == "lean" and lean_wire_supported() else "paho"

    def pause_reading(self) -> None:
        """Stop reading the socket, on this connection and the next ones, until
        `resume_reading()`: backpressure for a receiver whose queues are full (the broker
        holds the rest; nothing received is lost). Keep it shorter than the keepalive: a
        PINGRESP is not read either, and paho drops a link that does not answer."""
        self._reading_paused = True
        if self._conn is not None and self._conn.wire is not None:
            self._conn.wire.pause_reading()

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._conn is not None and self._conn.wire is not None:
            self._conn.wire.resume_reading()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.options.bandwidth_bytes_per_s > 0:
            self._bucket = TokenBucket(self.options.bandwidth_bytes_per_s, time.monotonic())
        self._stopping = False
        self._runner = asyncio.create_task(self._run(), name=f"mqtt-{self.options.client_id}")

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError as exc:
            raise TransportError(f"not connected to {self.options.url}: {self.last_error}") from exc

    async def wait_disconnected(self) -> None:
        conn = self._conn
        if conn is not None:
            await conn.closed.wait()

    async def stop(self, *, send_disconnect: bool = True) -> None:
        """Disconnect cleanly (no will) and stop reconnecting."""
        self._stopping = True
        conn = self._conn
        if conn is not None and send_disconnect and self.connected:
            await self._settled(conn, 2.0)
            conn.client.disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(conn.closed.wait(), 2.0)
        if conn is not None:
            self._close(conn, "client stopped")
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Send once there is room in the window; the returned future resolves on PUBACK.

        Raises TransportError when not connected; the future fails with TransportError
        when the connection drops before the acknowledgement. QoS 0 or 1 (nothing here
        needs QoS 2: receivers de-duplicate by seq).
        """
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos!r}")
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        await self._publish(topic, payload, qos, retain, fut)
        if qos == 0:
            fut.set_result(None)
        return fut

    async def send(self, topic: str, payload: bytes) -> None:
        """A QoS 1 publish with no future: returns once it is queued (room in the window);
        its PUBACK only frees the slot and counts in `acked` (or `rejected`)."""
        await self._publish(topic, payload, 1, False, None)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and at every later connect."""
        self.subscriptions = (*self.subscriptions, (topic, qos))
        if self._conn is not None and self.connected:
            self._subscribe(self._conn, ((topic, qos),))

    # -- publishing ----------------------------------------------------------------------

    def _current(self, expected: _Connection | None = None) -> _Connection:
        conn = self._conn
        if conn is None or not self.connected or (expected is not None and conn is not expected):
            raise TransportError(f"not connected to {self.options.url}")
        return conn

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        fut: asyncio.Future[None] | None,
    ) -> None:
        conn = self._current()
        if qos:
            await conn.slots.acquire()
        try:
            if self._bucket is not None:
                await asyncio.sleep(self._bucket.reserve(len(payload), time.monotonic()))
            wire = self._current(conn).wire
            assert wire is not None
            try:
                mid = wire.publish(topic, payload, qos, retain)
            except ConnectionError as exc:
                raise TransportError(f"publish to {topic} failed: {exc}") from exc
        except BaseException:
            if qos:
                conn.slots.release()
            raise
        if qos:
            conn.pending[mid] = fut

    async def _settled(self, conn: _Connection, timeout: float) -> None:
        """Wait (bounded) until everything queued is written and acknowledged, so that the
        DISCONNECT goes last and no PUBACK is still on its way: closing a socket with unread
        bytes sends a reset, which loses the DISCONNECT and makes the broker send the will.
        Only `stop()` waits for this, once; a poll keeps the wires free of events for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (  # noqa: ASYNC110
            conn.pending or (conn.wire is not None and conn.wire.unsent)
        ):
            await asyncio.sleep(DRAIN_POLL_S)

    # -- connection lifecycle ------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                conn = await self._connect()
            except TransportError as exc:
                self.last_error = str(exc)
                log.warning("mqtt connect to %s failed: %s", self.options.url, exc)
            else:
                self.backoff.reset()
                await conn.closed.wait()
                self._close(conn, "connection lost")
            if self._stopping:
                return
            await asyncio.sleep(self.backoff.next_delay())

    async def _connect(self) -> _Connection:
        assert self._loop is not None
        client = self._make_client()
        conn = _Connection(client, self.options.max_inflight)
        conn.connack = self._loop.create_future()
        self._conn = conn
        self._bind(conn)
        try:
            await self._loop.run_in_executor(None, self._blocking_connect, client)
            session_present, receive_max = await asyncio.wait_for(
                conn.connack, self.options.connect_timeout_s
            )
        except asyncio.TimeoutError as exc:
            self._close(conn, "connect failed")
            hint = f"; {NOT_MQTT5_HINT}" if self.options.mqtt_version == "5" else ""
            raise TransportError(
                f"cannot connect to {self.options.url}: no CONNACK within "
                f"{self.options.connect_timeout_s:g} s{hint}"
            ) from exc
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._close(conn, "connect failed")
            raise TransportError(f"cannot connect to {self.options.url}: {exc!r}") from exc
        except TransportError:
            self._close(conn, "connect refused")
            raise
        self._open(conn, session_present, receive_max)
        await self._after_connect(conn, session_present)
        return conn

    def _open(self, conn: _Connection, session_present: bool, receive_max: int) -> None:
        self.receive_maximum = receive_max
        window = max(1, min(self.options.max_inflight, receive_max))
        conn.window = window
        conn.slots = asyncio.Semaphore(window)
        self.connects += 1
        self._connected.set()
        if self._reading_paused and conn.wire is not None:
            conn.wire.pause_reading()
        conn.misc_task = asyncio.create_task(self._misc(conn))
        log.info(
            "mqtt connected to %s as %s (session_present=%s, window=%d)",
            self.options.url,
            self.options.client_id,
            session_present,
            window,
        )

    async def _after_connect(self, conn: _Connection, session_present: bool) -> None:
        self._subscribe(conn, self.subscriptions)
        if self._on_connect is not None:
            result = self._on_connect(session_present)
            if result is not None:
                await result

    def _subscribe(self, conn: _Connection, subs: tuple[tuple[str, int], ...]) -> None:
        if not subs:
            return
        if self.options.mqtt_version == "5":
            topics: list[Any] = [(t, SubscribeOptions(qos=q)) for t, q in subs]
        else:
            topics = list(subs)
        conn.client.subscribe(topics)

    def _close(self, conn: _Connection, reason: str) -> None:
        if self._conn is conn:
            self._conn = None
            if self._connected.is_set():
                self.disconnects += 1
            self._connected.clear()
        conn.fail_pending(reason)
        if conn.connack is not None:
            # Nobody awaits it when the TCP connect itself failed.
            _fail(conn.connack, TransportError(reason))
        if conn.misc_task is not None:
            conn.misc_task.cancel()
        if conn.wire is not None:
            conn.wire.close()
        sock = conn.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError, ssl.SSLError):
                sock.close()
        conn.closed.set()

    async def _misc(self, conn: _Connection) -> None:
        """paho's keepalive: PINGREQ when idle, and a dead link noticed without a PINGRESP."""
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            conn.client.loop_misc()

    # -- paho client setup ----------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        opts = self.options
        v5 = opts.mqtt_version == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=opts.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
        )
        # The window is ours (bounded by Receive Maximum); paho must not queue behind it.
        client.max_inflight_messages = 0
        client.max_queued_messages_set(0)
        if opts.username is not None:
            client.username_pw_set(opts.username, opts.password)
        if self.endpoint.tls:
            client.tls_set_context(self._tls_context())
        if opts.will is not None:
            w = opts.will
            client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        opts = self.options
        try:
            ctx = ssl.create_default_context(cafile=str(opts.ca_file) if opts.ca_file else None)
            if opts.cert_file is not None:
                ctx.load_cert_chain(str(opts.cert_file), str(opts.key_file or opts.cert_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("sync.ca_file", f"cannot load TLS files: {exc}") from exc
        return ctx

    def _blocking_connect(self, client: paho.Client) -> None:
        """Runs in a worker thread: DNS, TCP connect and the TLS handshake block."""
        opts = self.options
        if opts.mqtt_version == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = opts.session_expiry_s
            client.connect(
                self.endpoint.host,
                self.endpoint.port,
                keepalive=opts.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            client.connect(self.endpoint.host, self.endpoint.port, keepalive=opts.keepalive_s)

    def _bind(self, conn: _Connection) -> None:
        client = conn.client
        client.on_socket_open = lambda _c, _u, sock: self._in_loop(self._wire_up, conn, sock)
        client.on_socket_close = lambda _c, _u, sock: self._in_loop(self._on_socket_close, conn)
        client.on_socket_register_write = lambda _c, _u, _s: self._in_loop(
            self._write_wanted, conn, True
        )
        client.on_socket_unregister_write = lambda _c, _u, _s: self._in_loop(
            self._write_wanted, conn, False
        )
        client.on_connect = lambda _c, _u, flags, rc, props: self._on_connack(
            conn, flags, rc, props
        )
        client.on_disconnect = lambda _c, _u, _f, rc, _p: self._on_disconnected(conn, rc)
        bind_callbacks(client, functools.partial(self._on_ack, conn), self._deliver)

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """paho calls socket hooks from the connect worker thread too; hop to the loop. A
        client collected after its loop closed (paho's __del__ closes the socket, from any
        thread) has nobody left to tell."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(fn, *args)

    # -- the wire ------------------------------------------------------------------------

    def _wire_up(self, conn: _Connection, sock: Any) -> None:
        if conn.closed.is_set() or sock.fileno() < 0:
            return
        assert self._loop is not None
        if self.active_wire == "lean":
            conn.wire = LeanWire(
                conn.client,
                sock,
                self._loop,
                v5=self.options.mqtt_version == "5",
                on_ack=functools.partial(self._on_ack, conn),
                on_message=self._deliver,
                mid_in_use=lambda mid: mid in conn.pending,
            )
        else:
            conn.wire = PahoWire(conn.client, sock, self._loop)

    def _write_wanted(self, conn: _Connection, wanted: bool) -> None:
        if conn.wire is None or conn.closed.is_set():
            return
        if wanted:
            conn.wire.write_wanted()
        else:
            conn.wire.write_unwanted()

    def _on_socket_close(self, conn: _Connection) -> None:
        # paho closes the socket itself on errors; treat that as the connection ending.
        if conn.wire is not None:
            conn.wire.close()
        conn.closed.set()

    # -- paho callbacks (on the loop thread) ----------------------------------------------

    def _on_connack(self, conn: _Connection, flags: Any, rc: Any, props: Any) -> None:
        fut = conn.connack
        if fut is None or fut.done():
            return
        if rc.is_failure or rc.value in UNSUPPORTED_PROTOCOL:
            hint = ""
            if self.options.mqtt_version == "5" and rc.value in UNSUPPORTED_PROTOCOL:
                hint = f"; {NOT_MQTT5_HINT}"
            fut.set_exception(TransportError(f"broker refused the connection: {rc}{hint}"))
            return
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        fut.set_result((bool(flags.session_present), int(receive_max or MQTT5_MAX_RECEIVE)))

    def _on_disconnected(self, conn: _Connection, rc: Any) -> None:
        self.last_error = f"disconnected: {rc}"
        if conn.connack is not None and not conn.connack.done():
            # Closed before any CONNACK: how some 3.1.1 brokers answer an MQTT 5 CONNECT.
            hint = f"; {NOT_MQTT5_HINT}" if self.options.mqtt_version == "5" else ""
            _fail(
                conn.connack,
                TransportError(f"the broker closed the connection before CONNACK{hint}"),
            )
        conn.closed.set()

    def _on_ack(self, conn: _Connection, mid: int, reason: int) -> None:
        if mid not in conn.pending:
            return  # a QoS 0 publish (stock paho reports those too), or a stray PUBACK
        fut = conn.pending.pop(mid)
        conn.slots.release()
        if reason >= FAILURE_REASON:
            self.rejected += 1
            if fut is not None:
                _fail(fut, TransportError(f"broker rejected publish: {_reason_name(reason)}"))
        else:
            self.acked += 1
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _deliver(self, topic: str, payload: bytes, retained: bool) -> None:
        handler = self._on_retained if retained and self._on_retained else self._on_message
        if handler is None:
            return
        try:
            handler(topic, payload)
        except Exception:  # a handler bug must not take the connection down with it
            log.exception("mqtt message handler failed for %s", topic)


def _reason_name(reason: int) -> str:
    try:
        return str(ReasonCode(PacketTypes.PUBACK, identifier=reason))
    except (KeyError, ValueError):
        return f"reason code {reason:#04x}"
