"""`dgdm coordinator devices add|remove|list` and `dgdm telemetry watch` as real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from dgdm.sync.coordinator.config import load_config
from dgdm.sync.crypto import (
    derive_link_keys,
    generate_keypair,
    load_private_key,
    load_public_key,
    raw_public,
)
from dgdm.sync.envelope import Kind, seal
from dgdm.sync.mqtt import MqttClient, MqttOptions

DGDM = [sys.executable, "-c", "import sys; from dgdm.agent.cli import main; sys.exit(main())"]


def _config(tmp_path: Path, url: str) -> tuple[Path, str]:
    key, _, public_b64 = generate_keypair(tmp_path / "coord", name="coordinator")
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f'[coordinator]\nid = "cli"\ndata_dir = "{tmp_path / "data"}"\nprivate_key = "{key}"\n'
        f'[mqtt]\nbroker_url = "{url}"\n'
    )
    return path, public_b64


async def _dgdm(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *DGDM, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_devices_add_and_list(tmp_path, mqtt_broker) -> None:
    config, _ = _config(tmp_path, mqtt_broker.url)
    _, _, device_public = generate_keypair(tmp_path / "dev", name="device")
    code, out, _ = await _dgdm(
        "coordinator",
        "devices",
        "add",
        "cam-1",
        "--public-key",
        device_public,
        "--config",
        str(config),
    )
    assert code == 0
    assert "enrolled cam-1" in out
    code, out, _ = await _dgdm("coordinator", "devices", "list", "--config", str(config))
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(r["device_id"], r["public_key"]) for r in rows] == [("cam-1", device_public)]
    code, _, err = await _dgdm(
        "coordinator", "devices", "add", "cam-2", "--public-key", "nope", "--config", str(config)
    )
    assert code == 2
    assert "--public-key" in err
    assert "Traceback" not in err


async def test_devices_remove_withdraws_the_enrolment(tmp_path, mqtt_broker) -> None:
    config, _ = _config(tmp_path, mqtt_broker.url)
    _, _, device_public = generate_keypair(tmp_path / "dev", name="device")
    add = ("coordinator", "devices", "add", "cam-9", "--public-key", device_public)
    assert (await _dgdm(*add, "--config", str(config)))[0] == 0
    remove = ("coordinator", "devices", "remove", "cam-9", "--config", str(config))
    code, out, _ = await _dgdm(*remove)
    assert code == 0
    assert "removed cam-9" in out
    _, out, _ = await _dgdm("coordinator", "devices", "list", "--config", str(config))
    assert [(r["device_id"], r["public_key"]) for r in map(json.loads, out.splitlines())] == [
        ("cam-9", "")
    ]
    code, _, err = await _dgdm(*remove)  # not enrolled any more: a usage error, named
    assert code == 2
    assert "'cam-9' is not enrolled" in err
    assert "Traceback" not in err


async def test_telemetry_watch_prints_decrypted_telemetry(tmp_path, mqtt_broker, unique_id) -> None:
    config_path, coord_public = _config(tmp_path, mqtt_broker.url)
    device_id = unique_id[:64]
    key, _, device_public = generate_keypair(tmp_path / "dev", name="device")
    code, _, _ = await _dgdm(
        "coordinator", "devices", "add", device_id, "--public-key", device_public,
        "--config", str(config_path),
    )  # fmt: skip
    assert code == 0
    own, peer = load_private_key(key), load_public_key(coord_public)
    keys = derive_link_keys(own, peer, device_id, raw_public(own), raw_public(peer))
    watcher = await asyncio.create_subprocess_exec(
        *DGDM, "telemetry", "watch", "--device", device_id, "--config", str(config_path),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert load_config(config_path).mqtt.session_expiry_s == 60
    client = MqttClient(MqttOptions(url=mqtt_broker.url, client_id=f"pub-{device_id}"))
    await client.start()
    await client.wait_connected(10)
    try:
        assert watcher.stdout is not None
        line = b""
        for seq in range(1, 200):  # until the watcher has subscribed
            body = {"samples": [{"ts_ms": seq, "cpu_percent": 7.5}]}
            payload = seal(Kind.TELEMETRY, seq, 1, device_id, body, key=keys.up, key_id=keys.key_id)
            await client.publish(f"dgdm/v1/{device_id}/telemetry", payload)
            try:
                line = await asyncio.wait_for(watcher.stdout.readline(), 0.25)
                break
            except asyncio.TimeoutError:
                continue
        record = json.loads(line)
        assert record["device_id"] == device_id
        assert record["samples"][0]["cpu_percent"] == 7.5
        assert record["seq"] == record["samples"][0]["ts_ms"]
    finally:
        await client.stop()
        watcher.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(watcher.wait(), 10) == 0


def test_coordinator_session_expiry_is_short_and_configurable(tmp_path) -> None:
    import pytest

    from dgdm.sync.coordinator.service import Coordinator
    from dgdm.sync.errors import ConfigError

    path, _ = _config(tmp_path, "mqtt://127.0.0.1:1")
    assert Coordinator(load_config(path))._mqtt_options().session_expiry_s == 60
    env = {"DGDM__MQTT__SESSION_EXPIRY_S": "0"}
    assert Coordinator(load_config(path, env=env))._mqtt_options().session_expiry_s == 0
    with pytest.raises(ConfigError, match="session_expiry_s"):
        load_config(path, env={"DGDM__MQTT__SESSION_EXPIRY_S": "-1"})
