"""The sending process of the SIGKILL test: an outbox and a DeviceLink draining through the
broker, while coroutine producers enqueue results. Each seq is printed once its enqueue
returned (durable); the test kills this process with SIGKILL at random points.

Run as ``python sender_proc.py CONFIG_JSON``; `messages` 0 only drains what is queued.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from dgdm.sync.crypto import derive_link_keys, load_private_key, load_public_key, raw_public
from dgdm.sync.envelope import Kind, seal
from dgdm.sync.link import DeviceLink
from dgdm.sync.mqtt import MqttOptions
from dgdm.sync.outbox import Outbox

PRODUCERS = 8


async def run(cfg: dict[str, Any]) -> None:
    device_id = cfg["device_id"]
    own, peer = load_private_key(cfg["key"]), load_public_key(cfg["coord_public"])
    keys = derive_link_keys(own, peer, device_id, raw_public(own), raw_public(peer))

    def sealer(kind: Kind, seq: int, created_ms: int, body: Any) -> bytes:
        return seal(kind, seq, created_ms, device_id, body, key=keys.up, key_id=keys.key_id)

    outbox = Outbox(cfg["outbox"], device_id=device_id, sealer=sealer, max_bytes=1 << 26)
    options = MqttOptions(
        url=cfg["url"], client_id=f"dev-{device_id}", backoff_initial_s=0.05, backoff_max_s=0.5
    )
    link = DeviceLink(
        outbox, options, device_id=device_id, keys=keys, receipt_timeout_s=cfg["receipt_s"]
    )
    await link.start()
    print("started", flush=True)

    async def produce(offset: int) -> None:
        for i in range(offset, cfg["messages"], PRODUCERS):
            seq = await link.enqueue(Kind.RESULT, {"i": i, "round": cfg["round"]})
            sys.stdout.write(f"{seq}\n")
            sys.stdout.flush()

    await asyncio.gather(*(produce(p) for p in range(PRODUCERS)))
    print("done", flush=True)
    await asyncio.Event().wait()  # keep draining until killed


if __name__ == "__main__":
    asyncio.run(run(json.loads(sys.argv[1])))
