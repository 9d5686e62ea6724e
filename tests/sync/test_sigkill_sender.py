"""SIGKILL the sending process (outbox + DeviceLink in a real process) at random points.

After every kill: each message whose enqueue returned is still in the outbox or stored at
the coordinator (none lost), and each message gone from the outbox is stored (a receipt
deletes only what the coordinator committed). At the end a last sender drains the rest:
the coordinator holds every acknowledged message exactly once, the resends of unreceipted
messages de-duplicated.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from dgdm.sync.crypto import generate_keypair

from .conftest import eventually

SENDER = Path(__file__).with_name("sender_proc.py")
MESSAGES_PER_ROUND = 400


class Sender:
    """One run of sender_proc.py; `seqs` are those it reported durable."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.seqs: list[int] = []
        self.started = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SENDER), json.dumps(self.cfg), stdout=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self.started.wait(), 30)

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            text = line.decode().strip()
            if text == "started":
                self.started.set()
            elif text.isdigit():
                self.seqs.append(int(text))

    async def kill(self) -> None:
        assert self.proc is not None
        assert self._reader is not None
        self.proc.kill()  # SIGKILL
        await self.proc.wait()
        await self._reader


def outbox_seqs(path: Path) -> set[int]:
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT seq FROM messages")}
    finally:
        conn.close()


def stored_seqs(coordinator: Any, device_id: str) -> list[int]:
    rows = coordinator.store.results_since(device_id, 0, 1_000_000)
    return [r["seq"] for r in rows]


async def _kill_rounds(broker: Any, rig: Any, root: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    device_id = f"{rig.tag}-k"[:64]
    key, _, public_b64 = generate_keypair(root / "sender", name="device")
    coordinator = await rig.start_coordinator()
    await coordinator.add_device(device_id, public_b64)
    outbox = root / "sender" / "outbox.db"
    cfg = {
        "device_id": device_id,
        "key": str(key),
        "coord_public": rig.coord_public_b64,
        "outbox": str(outbox),
        "url": broker.url,
        "receipt_s": 2.0,
    }
    acknowledged: set[int] = set()
    ever_seen: set[int] = set()
    for round_no in range(rounds):
        sender = Sender({**cfg, "messages": MESSAGES_PER_ROUND, "round": round_no})
        await sender.start()
        await asyncio.sleep(rng.uniform(0.0, 0.6))
        await sender.kill()
        acknowledged.update(sender.seqs)
        remaining = outbox_seqs(outbox)  # read first: the stored set only grows
        stored = set(stored_seqs(coordinator, device_id))
        ever_seen |= remaining | stored
        lost = acknowledged - remaining - stored
        assert not lost, f"round {round_no}: acknowledged messages lost: {sorted(lost)[:10]}"
        deleted_unstored = (ever_seen - remaining) - stored
        assert not deleted_unstored, f"round {round_no}: deleted before stored: {deleted_unstored}"
    # A last sender with nothing new to say drains the rest.
    sender = Sender({**cfg, "messages": 0, "round": rounds})
    await sender.start()
    await eventually(lambda: not outbox_seqs(outbox), timeout=60, what="outbox drained")
    await sender.kill()
    stored_list = stored_seqs(coordinator, device_id)
    assert len(stored_list) == len(set(stored_list))  # de-duplicated at the coordinator
    assert acknowledged <= set(stored_list)
    assert coordinator.store.count() == len(stored_list)


async def test_sigkill_sender_loses_nothing_acknowledged(mqtt_broker, sync_rig, tmp_path) -> None:
    rig = sync_rig(mqtt_broker)
    await _kill_rounds(mqtt_broker, rig, tmp_path, rounds=3, seed=3)


@pytest.mark.soak
async def test_sigkill_sender_50_rounds(mqtt_broker, sync_rig, tmp_path) -> None:
    rig = sync_rig(mqtt_broker)
    await _kill_rounds(mqtt_broker, rig, tmp_path, rounds=50, seed=50)
