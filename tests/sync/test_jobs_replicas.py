"""A job across two real coordinator processes on one PostgreSQL store, one of them
SIGKILLed mid-job, and claims of a third that never published them: the survivor finishes
the job, every device runs the command exactly once, and no device was given a second seq
for it (the claim records the seq before the publish; a lost claim is published again
with the same seq once its lease ran out, and a device executes a seq at most once)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.broker import free_port
from dgdm.sync.child_procs import terminate
from dgdm.sync.coordinator.config import CoordinatorConfig, CoordinatorSection, StoreSection
from dgdm.sync.coordinator.jobs import parse_job
from dgdm.sync.coordinator.stores import open_store

from .conftest import eventually

PASSWORD_ENV = "DGDM_TEST_JOBS_PG_PASSWORD"
TOKEN = "replica-token"
DEVICES = 16


class Replica:
    def __init__(self, root: Path, index: int, broker_url: str, key: Path, url: str) -> None:
        self.port = free_port()
        self.log = root / f"replica-{index}.log"
        config = root / f"replica-{index}.toml"
        sections = {
            "coordinator": {
                "id": f"jobs-{index}",
                "data_dir": str(root / f"data-{index}"),
                "private_key": str(key),
            },
            # expiry 0: a killed replica's share of the replies goes to the survivor now
            "mqtt": {
                "broker_url": broker_url,
                "client_id": f"jobs-replica-{index}-{os.getpid()}",
                "session_expiry_s": 0,
            },
            "http": {"port": self.port, "token": TOKEN},
            "store": {"url": url, "password": f"env:{PASSWORD_ENV}"},
        }
        config.write_text(
            "".join(
                f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                for name, values in sections.items()
            )
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dgdm.agent", "coordinator", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            return bytes(answer.read())

    def commands_sent(self) -> float:
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith("dgdm_commands_sent_total "):
                return float(line.split()[1])
        return 0.0

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                self.get("/healthz")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        terminate(self.proc, 15)


@pytest.mark.slow
@pytest.mark.blocks_loop("it drives the PostgreSQL store synchronously between awaits")
async def test_a_replica_killed_mid_job_leaves_the_job_to_the_other(
    tmp_path: Path,
    mqtt_broker: Any,
    sync_rig: Any,
    pg_cluster: Any,
    pg_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, pg_cluster.password)
    url = pg_cluster.url(pg_database)
    rig = sync_rig(mqtt_broker)
    calls: dict[str, list[int]] = {}

    def recorder(device_id: str) -> Any:
        async def on_command(seq: int, body: dict[str, Any]) -> dict[str, Any]:
            calls.setdefault(device_id, []).append(seq)
            return {"pong": True}

        return on_command

    devices = []
    for i in range(DEVICES):
        name = f"{rig.tag}-r{i}"[:64]
        devices.append(rig.device(f"r{i}", on_command=recorder(name), receipt_timeout_s=2.0))
    store = open_store(
        CoordinatorConfig(
            coordinator=CoordinatorSection(data_dir=tmp_path / "cli"),
            store=StoreSection(url=url, password=f"env:{PASSWORD_ENV}"),
        )
    )
    replicas: list[Replica] = []
    try:
        for device in devices:
            store.add_device(device.device_id, device.public_b64, tags={"site": "kill"})
        replicas = [Replica(tmp_path, i, mqtt_broker.url, rig.coord_key, url) for i in range(2)]
        for replica in replicas:
            await asyncio.to_thread(replica.wait_healthy)
        for device in devices:
            await device.start()

        def all_online() -> bool:
            return sum(d["online"] for d in store.devices()) == DEVICES

        await eventually(all_online, timeout=30, what="every device online in the store")
        spec = parse_job(
            {"target": {"tags": {"site": "kill"}}, "command": {"cmd": "ping"}, "rate_per_s": 4}
        )
        job = store.create_job(spec, time.time_ns() // 1_000_000)
        # A third "replica" claims a few devices and dies before publishing: its claims
        # (seq allocated and recorded) must be published by the others, with those seqs.
        ghost: list[Any] = []
        for _ in range(50):
            ghost = store.job_tick(time.time_ns() // 1_000_000, "ghost", 3000, 3).sends
            if ghost:
                break
            await asyncio.sleep(0.05)
        assert ghost
        victim, survivor = replicas

        def victim_sent() -> bool:
            return victim.commands_sent() >= 1

        await eventually(victim_sent, timeout=30, what="the victim sending the job")
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        assert store.job(job["id"])["state"] == "running"  # killed mid-job

        def completed() -> bool:
            return store.job(job["id"])["state"] != "running"

        await eventually(completed, timeout=60, what="the survivor finishing the job")
        finished = store.job(job["id"])
        assert finished["state"] == "completed", finished
        assert finished["counts"]["succeeded"] == DEVICES, finished
        assert survivor.commands_sent() >= 1
        # Every device ran the job's command once, with the seq its target row records.
        targets = {t["device_id"]: t["seq"] for t in store.job_targets(job["id"], "", 100)}
        assert calls == {d: [s] for d, s in targets.items()}
        assert {s.device_id: s.seq for s in ghost}.items() <= targets.items()
        for device in devices:  # one stored command per device: no second seq
            assert len(store.commands(device.device_id, 10)) == 1
    finally:
        for replica in replicas:
            replica.stop()
        store.close()
