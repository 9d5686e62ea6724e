"""Bad wire input is rejected and counted; commands run once, with replies; the HTTP API."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp

from dgdm.sync.coordinator.service import RESEND_AFTER_MS
from dgdm.sync.envelope import Kind, seal
from dgdm.sync.link_state import ExecutedCommands
from dgdm.sync.mqtt import MqttClient

from .conftest import eventually, mqtt_options, online


def _pong_device(rig):
    """Device "d", answering every command with a pong; the list gets each seq it ran."""
    calls: list[int] = []

    async def on_command(seq, body):
        calls.append(seq)
        return {"pong": True}

    return rig.device("d", on_command=on_command), calls


async def _raw_publisher(broker, name):
    client = MqttClient(mqtt_options(broker, name))
    await client.start()
    await client.wait_connected(5)
    return client


async def test_bad_wire_input_is_rejected_and_counted(mqtt_broker, sync_rig, rig_store) -> None:
    rig = sync_rig(mqtt_broker, rig_store)
    device = rig.device("d")
    other = rig.device("o")
    coordinator = await rig.start_coordinator(max_envelope_bytes=4096)
    await device.start()
    dev, keys = device.device_id, device.keys
    pub = await _raw_publisher(mqtt_broker, f"evil-{dev}")

    def sealed(**kw):
        args = {"key": keys.up, "key_id": keys.key_id, **kw}
        return seal(Kind.RESULT, 7, 1, kw.pop("device", dev), {"x": 1}, **args)

    good = sealed()
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    cases = {
        "bad_magic": os.urandom(64),
        "bad_key_id": sealed(key_id=b"\0\0\0\1"),
        "device_mismatch": seal(
            Kind.RESULT, 7, 1, other.device_id, {}, key=keys.up, key_id=keys.key_id
        ),
        "bad_tag": tampered,
        "too_large": seal(
            Kind.RESULT,
            8,
            1,
            dev,
            {"x": "a" * 9000},
            key=keys.up,
            key_id=keys.key_id,
            compress=False,
        ),
    }
    try:
        for payload in cases.values():
            await (await pub.publish(f"dgdm/v1/{dev}/result", payload))
        await (await pub.publish("dgdm/v1/unknown-dev/result", good))
        await (await pub.publish(f"dgdm/v1/{dev}/status", b"not json"))
        rejected = {*cases, "unknown_device", "bad_status"}

        def counted() -> bool:
            m = coordinator.metrics
            values = {r: m.value("dgdm_coordinator_rejects_total", reason=r) for r in rejected}
            return all(v >= 1 for v in values.values())

        await eventually(counted, what="every reject counted")
        assert coordinator.store.count() == 0
        # The pipeline still works after all of that.
        device.enqueue(Kind.ALERT, {"code": "ok"})
        await eventually(lambda: device.queued() == 0)
    finally:
        await pub.stop()


async def test_commands_run_once_and_reply(mqtt_broker, sync_rig, rig_store) -> None:
    calls: list[tuple[int, dict]] = []

    async def on_command(seq, body):
        calls.append((seq, body))
        if body["cmd"] == "set_config":
            raise ValueError("key not allowed")
        return {"pong": True}

    rig = sync_rig(mqtt_broker, rig_store)
    device = rig.device("d", on_command=on_command)
    coordinator = await rig.start_coordinator()
    await device.start()
    seq = await coordinator.send_command(device.device_id, "ping", {}, 60_000)

    async def reply(n):
        for _ in range(500):
            got = await coordinator.command(device.device_id, n)
            if got["status"] == "replied":
                return got["reply"]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no reply: {calls} {device.link.snapshot()}")

    assert await reply(seq) == {"cmd_seq": seq, "ok": True, "error": None, "data": {"pong": True}}
    bad = await coordinator.send_command(device.device_id, "set_config", {"k": 1}, 60_000)
    assert (await reply(bad))["error"] == "key not allowed"

    # Replayed and expired commands are refused without running.
    keys = device.keys
    pub = await _raw_publisher(mqtt_broker, f"replay-{device.device_id}")
    try:
        topic = f"dgdm/v1/{device.device_id}/cmd"
        body = {"cmd": "ping", "args": {}, "ttl_ms": 60_000}
        replay = seal(
            Kind.COMMAND, seq, _now(), device.device_id, body, key=keys.down, key_id=keys.key_id
        )
        expired = seal(
            Kind.COMMAND,
            bad + 10,
            _now() - 120_000,
            device.device_id,
            body,
            key=keys.down,
            key_id=keys.key_id,
        )
        await (await pub.publish(topic, replay))
        await (await pub.publish(topic, expired))
        counters = device.link.counters
        await eventually(
            lambda: counters["rejected_replay"] == 1 and counters["rejected_expired"] == 1
        )
    finally:
        await pub.stop()
    assert [s for s, _ in calls] == [seq, bad]
    # The executed seqs survive a restart of the link.
    stored = ExecutedCommands.decode(device.outbox.get_state("last_command_seq"))
    assert stored.seen(seq)
    assert stored.seen(bad)


async def test_a_command_whose_publish_was_lost_is_sent_again_and_runs_once(
    mqtt_broker, sync_rig, rig_store
) -> None:
    """Stored but never published (a broker restart, a replica killed between its store
    and its publish): the resend round publishes it to the online device, within its TTL;
    a further copy is dropped by the device as a replay, so the command runs once."""
    rig = sync_rig(mqtt_broker, rig_store)
    device, calls = _pong_device(rig)
    coordinator = await rig.start_coordinator()
    await device.start()
    await online(coordinator, device.device_id)
    now = time.time_ns() // 1_000_000
    body = {"cmd": "ping", "args": {}, "ttl_ms": 600_000}
    lost = coordinator.store.new_command(device.device_id, body, now)
    expired = coordinator.store.new_command(device.device_id, {**body, "ttl_ms": 5_000}, now)
    later = now + RESEND_AFTER_MS + 1
    assert await coordinator.resend_commands(later) == 1  # not the expired one
    await eventually(
        lambda: coordinator.store.command(device.device_id, lost)["status"] == "replied",
        what="the lost command replied",
    )
    assert await coordinator.resend_commands(later) == 0  # replied: nothing to send again
    assert calls == [lost]
    assert coordinator.store.command(device.device_id, expired)["status"] == "pending"
    assert coordinator.metrics.value("dgdm_coordinator_commands_resent_total") == 1


async def test_a_command_a_crash_interrupted_is_answered_once_and_not_run_again(
    mqtt_broker, sync_rig, rig_store
) -> None:
    """The device persisted seq s as started, then died before queueing its reply: at the
    next start it answers s as interrupted, and a copy of s (the resend round) is dropped."""
    rig = sync_rig(mqtt_broker, rig_store)
    device, calls = _pong_device(rig)
    coordinator = await rig.start_coordinator()
    now = time.time_ns() // 1_000_000
    seq = coordinator.store.new_command(
        device.device_id, {"cmd": "ping", "args": {}, "ttl_ms": 600_000}, now
    )
    device.outbox.set_state("last_command_seq", ExecutedCommands().start(seq).encode())
    await device.start()
    await eventually(
        lambda: coordinator.store.command(device.device_id, seq)["status"] == "replied",
        what="the interrupted command answered",
    )
    reply = coordinator.store.command(device.device_id, seq)["reply"]
    assert reply["ok"] is False
    assert "interrupted" in reply["error"]
    await online(coordinator, device.device_id)
    await coordinator.publish_command(
        device.device_id, seq, now, {"cmd": "ping", "args": {}, "ttl_ms": 600_000}
    )
    await eventually(lambda: device.link.counters["rejected_replay"] == 1, what="copy dropped")
    assert calls == []
    assert ExecutedCommands.decode(device.outbox.get_state("last_command_seq")).running is None


async def test_http_api(mqtt_broker, sync_rig, rig_store) -> None:
    rig = sync_rig(mqtt_broker, rig_store)
    device = rig.device("d")
    coordinator = await rig.start_coordinator()
    await device.start()
    device.enqueue(Kind.RESULT, {"job_id": "a"})
    device.enqueue(Kind.TELEMETRY, {"samples": [{"ts_ms": 5}]})
    await eventually(lambda: device.queued() == 0)
    base = f"http://127.0.0.1:{coordinator.http_port}"
    auth = {"Authorization": "Bearer tok"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/devices") as r:
            assert r.status == 401
        async with http.get(f"{base}/devices", headers=auth) as r:
            ids = [d["device_id"] for d in (await r.json())["devices"]]
            assert device.device_id in ids
        async with http.get(f"{base}/devices/{device.device_id}", headers=auth) as r:
            info = await r.json()
            assert info["telemetry"]["body"] == {"samples": [{"ts_ms": 5}]}
        async with http.get(
            f"{base}/devices/{device.device_id}/results?since=0", headers=auth
        ) as r:
            page = await r.json()
            assert [x["body"]["job_id"] for x in page["results"]] == ["a"]
        async with http.get(
            f"{base}/devices/{device.device_id}/results?since={page['next']}", headers=auth
        ) as r:
            assert (await r.json())["results"] == []
        async with http.get(
            f"{base}/devices/{device.device_id}/results?since=x", headers=auth
        ) as r:
            assert r.status == 400
        url = f"{base}/devices/{device.device_id}/commands"
        async with http.post(url, json={"cmd": "reboot"}, headers=auth) as r:
            assert r.status == 422
            assert (await r.json())["field"] == "cmd"
        async with http.post(url, data=b"{", headers=auth) as r:
            assert r.status == 400
        async with http.post(url, json={"cmd": "ping"}, headers=auth) as r:
            assert r.status == 202
            seq = (await r.json())["seq"]
        async with http.get(f"{url}/{seq}", headers=auth) as r:
            assert (await r.json())["command"]["cmd"] == "ping"
        async with http.get(f"{base}/devices/nope", headers=auth) as r:
            assert r.status == 404
        async with http.get(f"{base}/metrics", headers=auth) as r:
            text = await r.text()
            assert 'dgdm_messages_in_total{kind="result"} 1.0' in text


def _now() -> int:
    import time

    return time.time_ns() // 1_000_000
