"""`dgdm agent backup|restore` with real parts: a running agent process committing results
to its outbox (`POST /diffuse?queue=1`, offline, so nothing is receipted) while `dgdm agent
backup` copies it; restore is refused while that agent runs; restored into a fresh data dir,
an agent started there on a private mosquitto delivers every result committed before the
backup began to a real coordinator, keeps its registered topology, and its new messages
take seqs above any it used before. What a coordinator set with `set_config` (saved in
`remote-config.json`) is backed up and restored with it, and checked before it is restored."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import sqlite3
import stat
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from dgdm.agent.config import load_config
from dgdm.agent.remote_config import OVERLAY_NAME
from dgdm.agent.runtime import Agent
from dgdm.sync import backup
from dgdm.sync.coordinator.config import (
    CoordinatorConfig,
    CoordinatorSection,
    HttpSection,
    MqttSection,
)
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.crypto import generate_keypair
from tests.agent.conftest import KARATE, AgentProcess, launch, write_config

from .conftest import eventually
from .test_backup import dgdm, dgdm_async

DEVICE = "edge-backup"


def stored_results(db: Path) -> dict[str, int]:
    """job_id -> device seq of every result the coordinator stored."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT seq, body FROM messages WHERE kind = 1").fetchall()
    finally:
        conn.close()
    return {json.loads(body)["job_id"]: int(seq) for seq, body in rows}


def post_results(agent: AgentProcess, graph: Any, out: list[tuple[str, int]], stop: Any) -> None:
    while not stop.is_set():
        answer = agent.post_json("/diffuse?queue=1", graph)
        assert answer.status == 200, answer.body
        body = answer.json()
        out.append((body["job_id"], body["outbox_seq"]))


async def test_agent_backup_while_committing_restore_and_deliver(
    tmp_path: Path, mqtt_broker: Any
) -> None:
    keys = tmp_path / "keys"
    device_key, _, device_pub = generate_keypair(keys, name="device")
    coord_key, _, coord_pub = generate_keypair(keys, name="coordinator")
    sections: dict[str, Any] = {
        "device": {"id": DEVICE, "private_key": str(device_key)},
        "sync": {"coordinator_public_key": coord_pub},
        "kernels": {"backend": "numpy"},
    }
    graph = json.loads(KARATE.read_text())
    (tmp_path / "live").mkdir()
    live = await asyncio.to_thread(launch, tmp_path / "live", sections)
    restored: AgentProcess | None = None
    coordinator: Coordinator | None = None
    stop = threading.Event()
    try:
        answer = await asyncio.to_thread(
            live.request, "PUT", "/graphs/club", json.dumps({**graph, "graph_id": "club"}).encode()
        )
        assert answer.status in (200, 201), answer.body
        committed: list[tuple[str, int]] = []
        poster = asyncio.create_task(asyncio.to_thread(post_results, live, graph, committed, stop))
        await eventually(lambda: len(committed) >= 30, 30, "30 results committed")
        before = dict(committed)  # each answered, so durable, before the backup began
        out = tmp_path / "agent.dgdm"
        code, stdout, stderr = await dgdm_async(
            "agent", "backup", "--out", str(out), "--config", str(live.config_path)
        )
        await eventually(lambda: len(committed) > len(before) + 10, 30, "results after it")
        stop.set()
        await poster
        assert code == 0, stderr
        assert "outbox.db" in stdout
        assert "topologies/ (2 files)" in stdout
        assert OVERLAY_NAME not in stdout  # the coordinator never sent set_config: none held
        assert out.stat().st_mode & 0o777 == 0o600

        refused = await asyncio.to_thread(
            dgdm, "agent", "restore", str(out), "--config", str(live.config_path)
        )
        assert refused.returncode == 1
        assert "refusing to restore: a running agent holds" in refused.stderr
        assert live.get("/outbox").json()["kinds"]["result"]["messages"] == len(committed)
        other = write_config(
            tmp_path / "other.toml", {"device": {"id": "other", "data_dir": str(tmp_path / "o")}}
        )
        wrong = await asyncio.to_thread(dgdm, "agent", "restore", str(out), "--config", str(other))
        assert wrong.returncode == 1
        assert f"is a backup of device {DEVICE!r}, this is 'other'" in wrong.stderr

        # A fresh data dir for the same device, restored, then an agent on it online.
        store = SqliteStore(tmp_path / "coord" / "coordinator.db")
        store.add_device(DEVICE, device_pub)
        coordinator = Coordinator(coordinator_config(tmp_path, mqtt_broker, coord_key), store=store)
        await coordinator.start(http=False)
        online = {
            **sections,
            "sync": {
                **sections["sync"],
                "broker_url": mqtt_broker.url,
                "mqtt_version": mqtt_broker.mqtt_version,
            },
        }
        fresh = tmp_path / "restored"
        fresh.mkdir()
        device = {**sections["device"], "data_dir": str(fresh / "data")}  # as launch() has it
        config = write_config(fresh / "agent.toml", {**online, "device": device})
        done = await asyncio.to_thread(dgdm, "agent", "restore", str(out), "--config", str(config))
        assert done.returncode == 0, done.stderr
        restored = await asyncio.to_thread(launch, tmp_path / "restored", online)
        db = tmp_path / "coord" / "coordinator.db"
        await eventually(lambda: set(before) <= set(stored_results(db)), 60, "all delivered")
        assert [g["graph_id"] for g in restored.get("/graphs").json()["graphs"]] == ["club"]
        answer = restored.post_json(
            "/graphs/club/diffuse", {"x": [n["features"] for n in graph["nodes"]]}
        )
        assert answer.status == 200, answer.body
        new = restored.post_json("/diffuse?queue=1", graph).json()
        assert new["outbox_seq"] > max(seq for _, seq in committed)
        await eventually(lambda: new["job_id"] in stored_results(db), 60, "the new one stored")
    finally:
        stop.set()  # the poster thread ends before the loop (and its executor) does
        await asyncio.to_thread(live.stop)
        if restored is not None:
            await asyncio.to_thread(restored.stop)
        if coordinator is not None:
            await coordinator.stop()


# -- the coordinator's settings (remote-config.json) ------------------------------------


@pytest.fixture
def agent_toml(tmp_path: Path) -> Path:
    sections = {"device": {"id": DEVICE, "data_dir": str(tmp_path / "data")}, "http": {"port": 0}}
    return write_config(tmp_path / "agent.toml", {**sections, "kernels": {"backend": "numpy"}})


async def in_process(config: Path) -> Agent:
    agent = Agent(load_config(config, env={}), config, env={})
    await agent.start()
    return agent


async def cli(*argv: str) -> Any:
    return await asyncio.to_thread(dgdm, "agent", *argv)


async def test_set_config_outlives_a_backup_wipe_and_restore(
    tmp_path: Path, agent_toml: Path
) -> None:
    await (await in_process(agent_toml)).stop()  # an outbox, no set_config yet
    older = tmp_path / "older.dgdm"  # as an older release's backup: no remote-config.json
    assert (await cli("backup", "--out", str(older), "--config", str(agent_toml))).returncode == 0
    agent = await in_process(agent_toml)
    try:
        await agent.set_config({"telemetry": {"interval_s": 2.5}})  # saved by remote_config
    finally:
        await agent.stop()
    out = tmp_path / "agent.dgdm"
    done = await cli("backup", "--out", str(out), "--config", str(agent_toml))
    assert done.returncode == 0, done.stderr
    assert f", {OVERLAY_NAME} to " in done.stdout

    data = tmp_path / "data"
    shutil.rmtree(data)
    done = await cli("restore", str(out), "--config", str(agent_toml))
    assert done.returncode == 0, done.stderr
    assert f", {OVERLAY_NAME} from " in done.stdout
    assert stat.S_IMODE((data / OVERLAY_NAME).stat().st_mode) == 0o600
    agent = await in_process(agent_toml)
    try:
        assert agent.config.telemetry.interval_s == 2.5
    finally:
        await agent.stop()

    # A backup without it restores; like an outbox it does not hold, the live file stays.
    done = await cli("restore", str(older), "--config", str(agent_toml))
    assert done.returncode == 0, done.stderr
    assert json.loads((data / OVERLAY_NAME).read_text()) == {"telemetry.interval_s": 2.5}


@pytest.mark.parametrize(
    ("text", "matching_hash", "words"),
    [
        (
            b'{"telemetry.interval_s": 9}',
            False,
            "does not match its SHA-256: the file is corrupt",
        ),
        (b"[1]", True, f"its {OVERLAY_NAME} must be an object of reloadable settings"),
        (
            b'{"telemetry.interval_s": 120}',  # over the file's batch_s (60)
            True,
            f"its {OVERLAY_NAME} fails this config: telemetry.batch_s must be >= telemetry.",
        ),
    ],
    ids=["corrupt", "not-settings", "refused-by-the-file"],
)
async def test_a_bad_remote_config_in_a_backup_is_refused(
    tmp_path: Path, agent_toml: Path, text: bytes, matching_hash: bool, words: str
) -> None:
    agent = await in_process(agent_toml)
    try:
        await agent.set_config({"telemetry": {"interval_s": 2.5}})
    finally:
        await agent.stop()
    good = tmp_path / "agent.dgdm"
    assert (await cli("backup", "--out", str(good), "--config", str(agent_toml))).returncode == 0
    bad = with_overlay(good, tmp_path / "bad.dgdm", text, matching_hash)
    shutil.rmtree(tmp_path / "data")
    done = await cli("restore", str(bad), "--config", str(agent_toml))
    assert done.returncode == 1, done.stderr
    assert words in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "outbox.db").exists()  # nothing restored
    assert not (tmp_path / "data" / OVERLAY_NAME).exists()


def with_overlay(source: Path, out: Path, text: bytes, matching_hash: bool) -> Path:
    """`source` with `text` as its remote-config.json; the manifest's size and SHA-256 made
    to match it, or left as they were (a corrupt member)."""
    with tarfile.open(source, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    manifest = json.loads(members[backup.MANIFEST])
    if matching_hash:
        entry = next(e for e in manifest["files"] if e["name"] == OVERLAY_NAME)
        entry.update(bytes=len(text), sha256=hashlib.sha256(text).hexdigest())
    members.update({backup.MANIFEST: json.dumps(manifest).encode(), OVERLAY_NAME: text})
    with tarfile.open(out, "w:gz") as tar:
        for name, raw in members.items():  # the manifest first, as it was
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return out


def coordinator_config(tmp_path: Path, broker: Any, key: Path) -> CoordinatorConfig:
    return CoordinatorConfig(
        coordinator=CoordinatorSection(data_dir=tmp_path / "coord", private_key=key),
        mqtt=MqttSection(
            broker_url=broker.url,
            mqtt_version=broker.mqtt_version,
            client_id=f"coord-{DEVICE}",
            share_group=f"g-{DEVICE}",
            session_expiry_s=0,
        ),
        http=HttpSection(port=0),
    )
