"""The bytes between paho and the socket: who reads, who writes, who handles which packet.

`MqttClient` (mqtt.py) runs the connection lifecycle; a wire moves its packets.

`PahoWire` is stock paho: `loop_read`/`loop_write` on the socket, `publish()`, paho's
callbacks. `LeanWire` keeps paho as the protocol engine for everything rare (CONNECT,
SUBSCRIBE, keepalive, DISCONNECT, QoS 2, anything malformed) but handles the packets that
come by the thousand itself, because paho's per-packet cost dominated the sync path: a
publish builds an MQTTMessage with a threading.Condition, a PUBACK builds a ReasonCode and
a Properties object, a received PUBLISH a Properties and an MQTTMessage, and every packet is
read with three or more recv calls. Here:

- the socket is read in large chunks into one buffer and complete frames are cut out of it;
  QoS 0/1 PUBLISH and PUBACK are decoded in a few lines (`parse_publish`, `parse_puback`);
  every other frame is handed to paho, one at a time, through its `_sock_recv` hook and
  `loop_read()`, so paho sees exactly the byte stream it would have read itself;
- everything written, our publishes and PUBACKs and paho's packets (through its
  `_sock_send` hook and `loop_write()`), goes through one output buffer, sent once per
  loop turn: many packets per send call, and paho's packets keep their place in the stream;
- end of stream and socket errors reach paho through the same `_sock_recv` hook, so paho
  closes the connection and reports it exactly as it would have.

The hooks are private paho methods: `lean_wire_supported()` checks that they are there and
that this is the paho major version they were read from; otherwise the stock wire is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import ssl
import struct
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import MQTTErrorCode

log = logging.getLogger(__name__)

AckHandler = Callable[[int, int], None]  # (mid, reason code): on PUBACK
# (topic, payload, retained): on an incoming PUBLISH; `retained` is its RETAIN flag, set
# only on what the broker sends from its retained store because we just subscribed.
PublishHandler = Callable[[str, bytes, bool], None]

PUBLISH = 0x30
PUBACK = 0x40
PAHO_HOOKS = ("_sock_recv", "_sock_send", "_mid_generate")
PAHO_MAJOR = 2
READ_BURST = 256  # stock wire: packets read per wake-up at most
RECV_CHUNK = 65536
MAX_READ_PER_WAKE = 1 << 20  # bytes; TLS records already decrypted are picked up next turn
SEND_CHUNK = 1 << 18
MAX_TOPIC_CACHE = 4096
MAX_MID = 65535
CLOSE_DISCARD_READS = 64


def lean_wire_supported() -> bool:
    """True when the installed paho has the private hooks LeanWire relies on."""
    major = paho_version.split(".", 1)[0]
    return major == str(PAHO_MAJOR) and all(
        callable(getattr(paho.Client, name, None)) for name in PAHO_HOOKS
    )


class Wire(Protocol):
    """What `MqttClient` needs from a wire; both implementations run on the event loop."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        """Queue a PUBLISH; returns its mid (0 for QoS 0)."""
        ...

    def write_wanted(self) -> None:
        """paho queued a packet (its on_socket_register_write)."""
        ...

    def write_unwanted(self) -> None:
        """paho has nothing left to write (its on_socket_unregister_write)."""
        ...

    @property
    def unsent(self) -> int:
        """Bytes (or packets) queued and not yet handed to the kernel."""
        ...

    def close(self) -> None:
        """The socket is closing: send what can be sent at once, stop watching the fd."""
        ...

    def pause_reading(self) -> None:
        """Stop reading the socket (backpressure: the broker then holds the messages)."""
        ...

    def resume_reading(self) -> None:
        """Read again, starting with whatever was received before the pause."""
        ...


def bind_callbacks(client: paho.Client, on_ack: AckHandler, on_message: PublishHandler) -> None:
    """paho's own PUBACK and PUBLISH callbacks, for packets that paho handles."""
    client.on_publish = lambda _c, _u, mid, rc, _p: on_ack(mid, rc.value)

    def message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8: %r", msg._topic)
            return
        # A received payload is always bytes (paho slices struct.unpack's bytes).
        on_message(topic, bytes(msg.payload), bool(msg.retain))

    client.on_message = message


# -- stock paho ---------------------------------------------------------------------------


class PahoWire:
    """paho as it comes: `publish()`, `loop_read()` when readable, `loop_write()` when writable."""

    def __init__(self, client: paho.Client, sock: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.sock = sock
        self.loop = loop
        self.fd: int | None = sock.fileno()
        self.paused = False
        loop.add_reader(self.fd, self._readable)

    @property
    def unsent(self) -> int:
        return int(self.client.want_write())

    def pause_reading(self) -> None:
        if self.fd is not None and not self.paused:
            self.loop.remove_reader(self.fd)
        self.paused = True

    def resume_reading(self) -> None:
        if self.fd is not None and self.paused:
            self.loop.add_reader(self.fd, self._readable)
            # TLS may hold decrypted records the socket no longer signals.
            self.loop.call_soon(self._readable)
        self.paused = False

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(paho.error_string(info.rc))
        return info.mid if qos else 0

    def _readable(self) -> None:
        # paho reads one packet per call when it has nothing in flight (a subscriber), so
        # keep reading while bytes are waiting: one loop wake-up per burst, not per packet.
        # TLS may hold decrypted records the socket no longer signals: drain those too.
        for _ in range(READ_BURST):
            if self.fd is None or self.paused:
                return
            if self.client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                continue
            if not select.select([self.sock], [], [], 0)[0]:
                return

    def write_wanted(self) -> None:
        if self.fd is not None:
            self.loop.add_writer(self.fd, self.client.loop_write)

    def write_unwanted(self) -> None:
        if self.fd is not None:
            self.loop.remove_writer(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            if not self.paused:
                self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            self.fd = None


# -- the lean wire ------------------------------------------------------------------------


class MalformedFrame(ValueError):
    """The byte stream cannot be cut into MQTT frames."""


def next_frame(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(start, end) of the body of the frame whose first byte is at `pos`, or None while
    the frame is incomplete. The remaining length is 1..4 bytes (MQTT §2.2.3)."""
    size = len(buf)
    i = pos + 1
    length = shift = 0
    while True:
        if i >= size:
            return None
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift == 28:
            raise MalformedFrame("remaining length longer than 4 bytes")
    end = i + length
    return (i, end) if end <= size else None


def parse_puback(
    cmd: int, buf: bytes | bytearray, start: int, end: int, v5: bool
) -> tuple[int, int] | None:
    """(mid, reason code) of a well-formed PUBACK body; None for anything paho should judge."""
    size = end - start
    if cmd != PUBACK or size < 2 or (size != 2 and not v5):
        return None
    mid = (buf[start] << 8) | buf[start + 1]
    if mid == 0:
        return None
    return mid, (buf[start + 2] if size > 2 else 0)


def parse_publish(
    cmd: int, buf: bytes | bytearray, start: int, end: int, v5: bool
) -> tuple[str, int, bytes] | None:
    """(topic, mid, payload) of a well-formed QoS 0/1 PUBLISH body (mid 0 for QoS 0); None
    for anything else (QoS 2, a topic alias, bad UTF-8, short or odd bodies): paho judges
    those. Properties are skipped: nothing downstream uses them."""
    qos = (cmd >> 1) & 3
    if qos > 1:
        return None
    try:
        return _publish_fields(qos, buf, start, end, v5)
    except (_OddFrame, UnicodeDecodeError):
        return None


class _OddFrame(Exception):
    """A frame the lean path leaves to paho."""


def _need(condition: bool) -> None:
    if not condition:
        raise _OddFrame


def _publish_fields(
    qos: int, buf: bytes | bytearray, start: int, end: int, v5: bool
) -> tuple[str, int, bytes]:
    _need(end - start >= 2)
    i = start + 2 + ((buf[start] << 8) | buf[start + 1])
    _need(start + 2 < i <= end)
    topic = buf[start + 2 : i].decode()
    mid = 0
    if qos:
        _need(i + 2 <= end)
        mid = (buf[i] << 8) | buf[i + 1]
        _need(mid != 0)
        i += 2
    if v5:
        props = _varint(buf, i, end)
        _need(props is not None)
        assert props is not None
        i = props[1] + props[0]
        _need(i <= end)
    return topic, mid, bytes(buf[i:end])


def _varint(buf: bytes | bytearray, i: int, end: int) -> tuple[int, int] | None:
    """(value, index after it) of an MQTT variable byte integer, None when malformed."""
    value = shift = 0
    while i < end and shift < 28:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    return None


def encode_length(length: int) -> bytes:
    """MQTT variable byte integer (the fixed header's remaining length)."""
    if length < 0x80:
        return bytes((length,))
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def encode_topic(topic: str) -> bytes:
    """A publish topic as a length-prefixed UTF-8 string; ValueError if it cannot be one."""
    raw = topic.encode()
    if not raw or b"+" in raw or b"#" in raw or b"\0" in raw or len(raw) > MAX_MID:
        raise ValueError(f"invalid publish topic {topic!r}")
    return struct.pack("!H", len(raw)) + raw


def encode_publish(
    topic: bytes, mid: int, payload: bytes, *, qos: int, retain: bool, v5: bool
) -> bytes:
    """A whole PUBLISH packet; `topic` as made by `encode_topic`. No properties."""
    variable = topic + (mid.to_bytes(2, "big") if qos else b"") + (b"\0" if v5 else b"")
    first = PUBLISH | (qos << 1) | int(retain)
    return bytes((first,)) + encode_length(len(variable) + len(payload)) + variable + payload


def encode_puback(mid: int) -> bytes:
    """PUBACK with success: 2 bytes of mid, reason code and properties left out (MQTT 5
    §3.4.2.1 allows that for success, and 3.1.1 has neither)."""
    return bytes((PUBACK, 2, mid >> 8, mid & 0xFF))


class LeanWire:
    """Reads, frames and writes the socket itself; paho handles what is rare (module doc)."""

    def __init__(
        self,
        client: paho.Client,
        sock: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        v5: bool,
        on_ack: AckHandler,
        on_message: PublishHandler,
        mid_in_use: Callable[[int], bool],
    ) -> None:
        self.client = client
        self.mid_in_use = mid_in_use
        self.sock = sock
        self.loop = loop
        self.v5 = v5
        self.on_ack = on_ack
        self.on_message = on_message
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.fd: int | None = sock.fileno()
        self._in = bytearray()
        self._out = bytearray()
        self._chunk = bytearray(RECV_CHUNK)
        self._topics: dict[str, bytes] = {}
        self._flush_scheduled = False
        self._writer = False
        # What paho reads through its _sock_recv hook: one frame, then the socket's fate.
        self._feed: bytes = b""
        self._fed = 0
        self._eof = False
        self._error: OSError | None = None
        self.paused = False
        client._sock_recv = self._paho_recv  # type: ignore[method-assign]
        client._sock_send = self._paho_send  # type: ignore[method-assign,assignment]
        loop.add_reader(self.fd, self._readable)

    @property
    def unsent(self) -> int:
        return len(self._out) + int(self.client.want_write())

    def pause_reading(self) -> None:
        """Also stops handling frames already buffered (even in the middle of a read: a
        message handler may pause); they stay in the input buffer for `resume_reading`."""
        if self.fd is not None and not self.paused:
            self.loop.remove_reader(self.fd)
        self.paused = True

    def resume_reading(self) -> None:
        if self.fd is not None and self.paused:
            self.loop.add_reader(self.fd, self._readable)
            self.loop.call_soon(self._readable)  # the buffered frames, without new bytes
        self.paused = False

    # -- writing ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        if self.fd is None:
            raise ConnectionError("the connection is closed")
        prefix = self._topics.get(topic)
        if prefix is None:
            prefix = self._topic_prefix(topic)
        mid = self._next_mid() if qos else 0
        self._out += encode_publish(prefix, mid, payload, qos=qos, retain=retain, v5=self.v5)
        self._schedule_flush()
        return mid

    def _topic_prefix(self, topic: str) -> bytes:
        if len(self._topics) >= MAX_TOPIC_CACHE:
            self._topics.clear()
        prefix = self._topics[topic] = encode_topic(topic)
        return prefix

    def _next_mid(self) -> int:
        # paho's counter, because SUBSCRIBE and UNSUBSCRIBE share the packet identifier
        # space; one still waiting for its PUBACK is skipped (paho refuses it instead).
        for _ in range(MAX_MID):
            mid = int(self.client._mid_generate())
            if not self.mid_in_use(mid):
                return mid
        raise ConnectionError("every packet identifier is waiting for a PUBACK")

    def write_wanted(self) -> None:
        self._schedule_flush()

    def write_unwanted(self) -> None:
        """paho's packets are already in our buffer by then; the buffer decides."""

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.fd is None:
            return
        if self.client.want_write():
            self.client.loop_write()  # paho's packets join the buffer, behind ours
        if not self._writer:
            self._send()

    def _paho_send(self, data: bytes | bytearray) -> int:
        self._out += data
        return len(data)

    def _send(self) -> None:
        out = self._out
        while out and self.fd is not None:
            try:
                sent = self.sock.send(out if len(out) <= SEND_CHUNK else out[:SEND_CHUNK])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._watch_write(True)
                return
            except OSError as exc:
                out.clear()
                self._error = exc
                self._to_paho(b"")
                return
            del out[:sent]
        self._watch_write(False)

    def _watch_write(self, on: bool) -> None:
        if self.fd is None or on == self._writer:
            return
        self._writer = on
        if on:
            self.loop.add_writer(self.fd, self._send)
        else:
            self.loop.remove_writer(self.fd)

    # -- reading ---------------------------------------------------------------------------

    def _readable(self) -> None:
        if self.fd is None or self.paused:  # closed or paused since this was scheduled
            return
        self._recv()
        try:
            self._handle_frames()
        except MalformedFrame as exc:
            # Unframeable: let paho read the rest and fail the connection its own way.
            log.warning("mqtt stream from the broker is malformed: %s", exc)
            rest, self._in = bytes(self._in), bytearray()
            self._to_paho(rest)
        if self.paused:
            # The rest of the input waits for resume_reading; so does end of stream.
            self._flush()
            return
        if self.fd is not None and (self._eof or self._error is not None):
            self._to_paho(b"")
        if self.fd is not None:
            self._flush()
            if self.tls and self.sock.pending():
                self.loop.call_soon(self._readable)

    def _recv(self) -> None:
        """Read what the socket has (up to MAX_READ_PER_WAKE) into the input buffer."""
        chunk, view = self._chunk, memoryview(self._chunk)
        total = 0
        try:
            while total < MAX_READ_PER_WAKE:
                n = self.sock.recv_into(chunk)
                if n == 0:
                    self._eof = True
                    return
                self._in += view[:n]
                total += n
                if n < RECV_CHUNK and not self.tls:
                    return
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._error = exc
        finally:
            view.release()

    def _handle_frames(self) -> None:
        buf, v5 = self._in, self.v5
        pos, size = 0, len(buf)
        try:
            while pos < size and self.fd is not None and not self.paused:
                frame = next_frame(buf, pos)
                if frame is None:
                    break
                # Consumed before it is handled: a handler that raises does not see it again.
                first, (start, end) = pos, frame
                pos = end
                cmd = buf[first]
                kind = cmd & 0xF0
                handled = False
                if kind == PUBACK:
                    ack = parse_puback(cmd, buf, start, end, v5)
                    if ack is not None:
                        self.on_ack(*ack)
                        handled = True
                elif kind == PUBLISH:
                    handled = self._publish_in(cmd, buf, start, end)
                if not handled:
                    self._to_paho(bytes(buf[first:end]))
        finally:
            del buf[:pos]

    def _publish_in(self, cmd: int, buf: bytearray, start: int, end: int) -> bool:
        msg = parse_publish(cmd, buf, start, end, self.v5)
        if msg is None:
            return False
        topic, mid, payload = msg
        self.on_message(topic, payload, bool(cmd & 1))
        if mid:
            self._out += encode_puback(mid)
        return True

    def _to_paho(self, frame: bytes) -> None:
        """paho reads `frame` (then end of stream or the socket error, if any) and handles it."""
        self._feed, self._fed = frame, 0
        try:
            self.client.loop_read()
        finally:
            self._feed = b""

    def _paho_recv(self, bufsize: int) -> bytes:
        fed = self._fed
        if fed < len(self._feed):
            self._fed = fed + bufsize
            return self._feed[fed : fed + bufsize]
        if self._error is not None:
            raise self._error
        if self._eof:
            return b""
        raise BlockingIOError

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Called as paho closes the socket (after a DISCONNECT too): one last send, no wait,
        and what was received but not read is discarded, since closing a socket with unread
        bytes sends a reset that can overtake the DISCONNECT."""
        if self.fd is None:
            return
        if self._error is None:
            with contextlib.suppress(OSError):
                if self._out:
                    del self._out[: self.sock.send(self._out)]
                for _ in range(CLOSE_DISCARD_READS):
                    if not self.sock.recv_into(self._chunk):
                        break
        if not self.paused:
            self.loop.remove_reader(self.fd)
        if self._writer:
            self.loop.remove_writer(self.fd)
        self.fd = None
