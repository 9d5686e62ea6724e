"""Fuzz the coordinator's ingest (issue 16): arbitrary bytes and sealed, valid-looking envelopes
with extreme integers, deep JSON and zlib bombs, mixed in batches with a good device's
messages, through the real `ingest.store_envelopes` into a real SQLite file. It never raises past
the per-message boundary, never loses or fails to receipt a good message, never receipts a
plaintext seq, and its memory stays bounded. A second test streams bombs through a real
mosquitto into a running coordinator and reads its VmHWM."""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import zlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgdm.sync.envelope import (
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    NONCE_BYTES,
    PRIORITY,
    VERSION,
    Header,
    Kind,
    seal,
)
from dgdm.sync.mqtt import MqttClient

from .conftest import eventually, mqtt_options
from .test_coordinator_hostile import Rig, make_rig

UPLINK = [Kind.RESULT, Kind.TELEMETRY, Kind.ALERT, Kind.REPLY]
TELEMETRY = {"samples": [{"ts_ms": 1, "cpu_percent": 3.5}]}
extreme_ints = st.one_of(
    st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
body_ints = st.one_of(
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 2**200, -1]), st.integers(-(2**70), 2**70)
)


def _deep(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


def _bomb(pattern: bytes, mib: int) -> bytes:
    return b'{"a":[' + pattern * (mib * 1024 * 1024 // len(pattern)) + b"0]}"


raw_bodies = st.one_of(
    st.builds(_deep, st.integers(1, 100_000)),
    st.builds(_bomb, st.sampled_from([b"[],", b"{},", b"0,", b'"",']), st.integers(1, 8)),
    st.sampled_from(
        [
            b'{"a":NaN}',
            b'{"a":1e400}',
            b'{"a":-Infinity}',
            b'{"cmd_seq":18446744073709551616}',
            b"[]",
            b"null",
            b"\xff\xfe",
            b'{"a":"\\ud800"}',
            b"",
        ]
    ),
    st.builds(lambda n: b'{"cmd_seq":%d,"ok":true}' % n, body_ints),
    st.binary(max_size=300),
)


@st.composite
def hostile(draw: Any) -> tuple[str, Kind, Any]:
    """(topic kind, what to build): raw bytes, or a sealed/plaintext envelope of `bad`."""
    kind = draw(st.sampled_from(UPLINK))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return ("raw", kind, draw(st.binary(max_size=2000)))
    spec = {
        "kind": draw(st.sampled_from([*UPLINK, kind, kind])),
        "seq": draw(extreme_ints),
        "created": draw(extreme_ints),
        "body": draw(raw_bodies),
        "compress": draw(st.sampled_from([True, False, None])),
        "sealed": choice != 3,
    }
    return ("envelope", kind, spec)


def _payload(rig: Rig, spec: dict[str, Any]) -> bytes:
    keys = rig.keys["bad"]
    return seal(
        spec["kind"],
        spec["seq"],
        spec["created"],
        "bad",
        spec["body"],
        key=keys.up if spec["sealed"] else None,
        key_id=keys.key_id,
        compress=spec["compress"],
    )


@pytest.fixture(scope="module")
def fuzz_rig(tmp_path_factory: pytest.TempPathFactory) -> Any:
    made = make_rig(tmp_path_factory.mktemp("fuzz"), plaintext=("bad",))
    yield made
    made.store.close()


_good_seqs = itertools.count(1)


def _deflated_lists(size: int) -> bytes:
    """`{"a":[[],[],...]}` of `size` bytes, deflated without holding it inflated."""
    packer = zlib.compressobj(9)
    chunk = b"[]," * 100_000
    parts = [packer.compress(b'{"a":[')]
    parts += [packer.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(packer.compress(b"[]]}") + packer.flush())
    return b"".join(parts)


def _reset_vmhwm() -> int:
    """Reset the peak RSS to the current RSS (Linux >= 4.0), so a growth is measurable."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vmhwm_kib()


def _vmhwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(messages=st.lists(hostile(), min_size=1, max_size=6), good_at=st.integers(0, 6))
def test_ingest_never_raises_and_never_loses_the_good_device(fuzz_rig, messages, good_at) -> None:
    rig = fuzz_rig
    raw: list[tuple[str, Kind, bytes]] = []
    for what, kind, spec in messages:
        raw.append(("bad", kind, spec if what == "raw" else _payload(rig, spec)))
    good = [next(_good_seqs), next(_good_seqs)]
    raw.insert(
        min(good_at, len(raw)),
        ("good", Kind.ALERT, rig.sealed("good", Kind.ALERT, good[0], {"code": "x"})),
    )
    raw.append(("good", Kind.TELEMETRY, rig.sealed("good", Kind.TELEMETRY, good[1], TELEMETRY)))
    before = _reset_vmhwm()
    batch, result = rig.ingest(raw)
    # Bombs of up to 8 MiB of tiny lists were ~240 MB of Python objects each before the fix.
    assert _vmhwm_kib() - before < 100 * 1024
    assert sorted(batch.seqs["good"]) == good
    assert "good" in result.receipt_seqs
    assert rig.store.latest("good", Kind.ALERT, 1)[0]["seq"] == good[0]
    assert rig.store.latest("good", Kind.TELEMETRY, 1)[0]["seq"] == good[1]
    plaintext = {
        spec["seq"] for what, _, spec in messages if what == "envelope" and not spec["sealed"]
    }
    sealed = {spec["seq"] for what, _, spec in messages if what == "envelope" and spec["sealed"]}
    assert not (set(batch.seqs.get("bad", [])) & (plaintext - sealed))


@pytest.mark.blocks_loop("it deflates a 64 MiB bomb and seals 400 envelopes inline")
async def test_a_stream_of_bombs_keeps_the_coordinator_within_100_mb(
    sync_rig: Any, mqtt_broker: Any
) -> None:
    """The issue's 65 KB envelope (64 MiB of `[],` deflated), sealed with a real key, 200
    times on every uplink kind through mosquitto, while a good device keeps sending: VmHWM
    grows by less than 100 MB and every good message is stored."""
    rig = sync_rig(mqtt_broker)
    good, bad = rig.device("good"), rig.device("bad")
    coordinator = await rig.start_coordinator()
    client = MqttClient(mqtt_options(mqtt_broker, f"bomber-{rig.tag}"))
    await client.start()
    await client.wait_connected(10)
    deflated = _deflated_lists(64 * 1024 * 1024)
    k, g = bad.keys, good.keys
    before = _reset_vmhwm()
    try:
        for i in range(200):
            kind = UPLINK[i % len(UPLINK)]
            payload = _sealed_raw(kind, i + 1, bad.device_id, deflated, k)
            await client.publish(f"dgdm/v1/{bad.device_id}/{kind.name.lower()}", payload)
            body = {"code": "ok", "i": i}
            ok = seal(Kind.ALERT, i + 1, 1, good.device_id, body, key=g.up, key_id=g.key_id)
            await client.publish(f"dgdm/v1/{good.device_id}/alert", ok)
            if i % 20 == 0:
                await asyncio.sleep(0)
        await eventually(
            lambda: len(coordinator.store.latest(good.device_id, Kind.ALERT, 1000)) == 200,
            timeout=60,
            what="every good alert stored",
        )
    finally:
        await client.stop()
    grown_mb = (_vmhwm_kib() - before) / 1024
    print(f"bombs: {len(deflated)} bytes each, VmHWM grew {grown_mb:.1f} MB")
    assert grown_mb < 100
    # Each bomb is quarantined, or dropped unread by the ingest quota (bytes per device).
    assert coordinator.store.quarantined(bad.device_id, 1000)
    assert coordinator.store.latest(bad.device_id, Kind.ALERT, 10) == []


def _sealed_raw(kind: Kind, seq: int, device_id: str, deflated: bytes, keys: Any) -> bytes:
    """A sealed envelope whose body is already deflated (seal would deflate 64 MiB each time)."""
    nonce = os.urandom(NONCE_BYTES)
    flags = FLAG_ENCRYPTED | FLAG_COMPRESSED
    header = Header(VERSION, flags, kind, PRIORITY[kind], keys.key_id, seq, 1, nonce, device_id)
    aad = header.pack()
    return aad + AESGCM(keys.up).encrypt(nonce, deflated, aad)
