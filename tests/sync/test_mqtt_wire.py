"""The lean wire's MQTT codec against paho's own encoder and decoder, and the paho hooks it
relies on (these tests fail first if a paho upgrade moves them)."""

from __future__ import annotations

import inspect
import socket

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import __version__ as paho_version
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dgdm.sync import mqtt_wire
from dgdm.sync.mqtt_wire import (
    MalformedFrame,
    encode_length,
    encode_puback,
    encode_publish,
    encode_topic,
    lean_wire_supported,
    next_frame,
    parse_puback,
    parse_publish,
)

topics = st.text(
    st.characters(blacklist_characters="+#\0", blacklist_categories=("Cs",)), min_size=1
).filter(lambda t: len(t.encode()) <= 300)
payloads = st.binary(max_size=20_000)
mids = st.integers(1, 65535)


def _paho_bytes(v5: bool, send: str, *args: object) -> bytes:
    """What a real paho client writes to its socket for `client.<send>(*args)`."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        client._sock = ours
        getattr(client, send)(*args)
        client._sock = None
        theirs.setblocking(False)
        chunks = []
        while True:
            try:
                chunks.append(theirs.recv(1 << 20))
            except BlockingIOError:
                return b"".join(chunks)


def _body(packet: bytes) -> tuple[int, bytes]:
    frame = next_frame(packet, 0)
    assert frame is not None
    assert frame[1] == len(packet)
    return packet[0], packet[frame[0] :]


# -- the paho hooks --------------------------------------------------------------------


def test_the_installed_paho_has_the_hooks_the_lean_wire_uses() -> None:
    """If this fails after a paho upgrade, the lean wire is off (stock paho runs); re-read
    paho's _packet_read/_packet_write and update mqtt_wire before turning it back on."""
    assert paho_version.startswith(f"{mqtt_wire.PAHO_MAJOR}.")
    assert lean_wire_supported()
    read = inspect.getsource(paho.Client._packet_read)
    write = inspect.getsource(paho.Client._packet_write)
    assert "self._sock_recv(" in read
    assert "self._sock.recv" not in read
    assert "self._sock_send(" in write
    assert "self._sock.send" not in write
    loop_read = inspect.getsource(paho.Client.loop_read)
    assert "self._packet_read()" in loop_read
    assert "_out_packet" in inspect.getsource(paho.Client.want_write)
    assert "_last_mid" in inspect.getsource(paho.Client._mid_generate)


def test_an_unknown_paho_major_version_falls_back_to_stock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mqtt_wire, "paho_version", "3.0.0")
    assert not lean_wire_supported()


def test_a_missing_hook_falls_back_to_stock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(paho.Client, "_sock_recv")
    assert not lean_wire_supported()


# -- encoding ------------------------------------------------------------------------------


# Each example runs a paho client; on a loaded 2-core box the 200 ms deadline timed the
# machine (1.7 s seen), not the code.
@settings(deadline=None)
@given(topics, mids, payloads, st.sampled_from([0, 1]), st.booleans(), st.booleans())
def test_publish_bytes_are_paho_bytes(
    topic: str, mid: int, payload: bytes, qos: int, retain: bool, v5: bool
) -> None:
    ours = encode_publish(encode_topic(topic), mid, payload, qos=qos, retain=retain, v5=v5)
    expected_mid = mid if qos else 0
    info = paho.MQTTMessageInfo(expected_mid)
    theirs = _paho_bytes(
        v5, "_send_publish", expected_mid, topic.encode(), payload, qos, retain, False, info
    )
    assert ours == theirs


@given(mids)
def test_puback_bytes_are_paho_bytes(mid: int) -> None:
    assert encode_puback(mid) == _paho_bytes(True, "_send_puback", mid)


@given(st.integers(0, 268_435_455))
def test_remaining_length_round_trips(length: int) -> None:
    encoded = encode_length(length)
    assert 1 <= len(encoded) <= 4
    assert next_frame(b"\x30" + encoded + b"\0" * min(length, 10), 0) == (
        None if length > 10 else (1 + len(encoded), 1 + len(encoded) + length)
    )


@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "nul\0", "x" * 65536])
def test_a_topic_no_broker_accepts_is_refused(topic: str) -> None:
    with pytest.raises(ValueError, match="invalid publish topic"):
        encode_topic(topic)


# -- decoding ------------------------------------------------------------------------------


def _properties(expiry: int, user: list[tuple[str, str]]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = expiry
    if user:
        props.UserProperty = user
    return props


@given(
    topics,
    mids,
    payloads,
    st.sampled_from([0, 1]),
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.lists(st.tuples(st.text(max_size=200), st.text(max_size=200)), max_size=3),
)
def test_publish_from_paho_parses_with_its_properties_skipped(
    topic: str,
    mid: int,
    payload: bytes,
    qos: int,
    v5: bool,
    expiry: int,
    user: list[tuple[str, str]],
) -> None:
    props = _properties(expiry, user) if v5 else None
    packet = _paho_bytes(
        v5, "_send_publish", mid if qos else 0, topic.encode(), payload, qos, False, False,
        paho.MQTTMessageInfo(mid), props,
    )  # fmt: skip
    cmd, body = _body(packet)
    assert parse_publish(cmd, body, 0, len(body), v5) == (topic, mid if qos else 0, payload)


@pytest.mark.parametrize(
    ("cmd", "body", "v5"),
    [
        (0x34, b"\x00\x01t\x00\x07\x00", True),  # QoS 2: paho's
        (0x32, b"\x00\x00\x00\x07\x00", True),  # empty topic (a topic alias)
        (0x32, b"\x00\x05ab", True),  # topic longer than the body
        (0x32, b"\x00\x01t\x00\x00\x00", True),  # mid 0
        (0x32, b"\x00\x01t\x00", True),  # no room for the mid
        (0x32, b"\x00\x02\xff\xfe\x00\x07\x00", True),  # topic not UTF-8
        (0x32, b"\x00\x01t\x00\x07\x05ab", True),  # properties longer than the body
        (0x32, b"\x00\x01t\x00\x07\xff\xff\xff\xff\x01", True),  # 5-byte property length
        (0x30, b"\x00", False),  # too short for a topic length
    ],
)
def test_odd_publish_frames_are_left_to_paho(cmd: int, body: bytes, v5: bool) -> None:
    assert parse_publish(cmd, body, 0, len(body), v5) is None


PUBACK_REASONS = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]  # MQTT 5 §3.4.2.1


@given(mids, st.sampled_from(PUBACK_REASONS), st.booleans())
def test_puback_from_a_broker_parses(mid: int, reason: int, props: bool) -> None:
    body = mid.to_bytes(2, "big") + bytes([reason]) + (b"\x03\x1f\x00\x00" if props else b"")
    assert parse_puback(0x40, body, 0, len(body), True) == (mid, reason)
    short = mid.to_bytes(2, "big")
    assert parse_puback(0x40, short, 0, 2, True) == (mid, 0)
    assert parse_puback(0x40, short, 0, 2, False) == (mid, 0)
    got = _packet.decode_puback(0x40, body, MQTTProtocolVersion.MQTTv5)
    assert (got.mid, got.reason.value) == (mid, reason)


@pytest.mark.parametrize(
    ("cmd", "body", "v5"),
    [
        (0x40, b"\x00\x01\x00", False),  # 3.1.1: exactly two bytes
        (0x40, b"\x00", True),
        (0x40, b"\x00\x00", True),  # mid 0
        (0x42, b"\x00\x01", True),  # reserved flags set
    ],
)
def test_odd_pubacks_are_left_to_paho(cmd: int, body: bytes, v5: bool) -> None:
    assert parse_puback(cmd, body, 0, len(body), v5) is None


# -- framing -------------------------------------------------------------------------------

frames = st.lists(
    st.one_of(
        mids.map(encode_puback),
        st.tuples(topics, mids, st.binary(max_size=20_000)).map(
            lambda t: encode_publish(encode_topic(t[0]), t[1], t[2], qos=1, retain=False, v5=True)
        ),
    ),
    min_size=1,
    max_size=8,
)


@given(frames, st.lists(st.integers(1, 5000), min_size=1, max_size=50))
def test_frames_are_cut_from_any_chunking(packets: list[bytes], cuts: list[int]) -> None:
    """The buffer grows in arbitrary chunks, as recv delivers it; every frame comes out
    whole, exactly once, in order."""
    stream = b"".join(packets)
    buf, got, fed = bytearray(), [], 0
    sizes = iter(cuts * (len(stream) // len(cuts) + 1))
    while fed < len(stream):
        step = next(sizes)
        buf += stream[fed : fed + step]
        fed += step
        while (frame := next_frame(buf, 0)) is not None:
            got.append(bytes(buf[: frame[1]]))
            del buf[: frame[1]]
    assert got == packets
    assert not buf


def test_a_five_byte_remaining_length_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        next_frame(b"\x30\xff\xff\xff\xff\x01", 0)
    assert next_frame(b"\x30\xff\xff\xff", 0) is None  # incomplete, not yet malformed
