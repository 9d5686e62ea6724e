"""`dgdm telemetry watch`: decrypt and print telemetry as JSON lines while it arrives.

A separate, non-shared subscriber (a throwaway session), so it sees every message without
taking any away from the coordinators; keys come from the coordinator's registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import TextIO

from dgdm.sync.coordinator.config import CoordinatorConfig
from dgdm.sync.coordinator.limits import body_limits
from dgdm.sync.coordinator.registry import Registry
from dgdm.sync.coordinator.stores import open_store
from dgdm.sync.crypto import load_private_key
from dgdm.sync.envelope import BodyLimits, Kind, open_envelope
from dgdm.sync.errors import EnvelopeError
from dgdm.sync.mqtt import MqttClient, options_from_settings
from dgdm.sync.topics import device_topic, fleet_filter, parse_topic


def telemetry_line(
    registry: Registry, topic: str, payload: bytes, limits: BodyLimits | None = None
) -> str | None:
    """One JSON line for a valid telemetry envelope, None for anything else."""
    parsed = parse_topic(topic)
    if parsed is None:
        return None
    device_id = parsed[0]
    keys = registry.keys_for(device_id)
    try:
        env = open_envelope(
            payload,
            key=keys.up if keys else None,
            key_id=keys.key_id if keys else None,
            expected_device=device_id,
            allow_plaintext_telemetry=True,
            limits=limits,
        )
    except EnvelopeError as exc:
        return json.dumps({"device_id": device_id, "rejected": exc.reason})
    if env.header.kind is not Kind.TELEMETRY:
        return None
    record = {"device_id": device_id, "seq": env.header.seq, "created_ms": env.header.created_ms}
    return json.dumps({**record, **env.body}, sort_keys=True)


async def watch(config: CoordinatorConfig, device: str | None, out: TextIO = sys.stdout) -> int:
    store = open_store(config)  # the same [store] as the service
    registry = Registry(load_private_key(config.coordinator.private_key), store.public_keys)
    registry.reload()
    limits = body_limits(config, Kind.TELEMETRY)  # a hostile device's bomb costs no more here

    def on_message(topic: str, payload: bytes) -> None:
        line = telemetry_line(registry, topic, payload, limits)
        if line is not None:
            print(line, file=out, flush=True)

    topic = device_topic(device, "telemetry") if device else fleet_filter("telemetry", shared=False)
    client_id = f"dgdm-watch-{os.getpid()}-{os.urandom(3).hex()}"
    options = options_from_settings(config.mqtt, client_id, session_expiry_s=0)
    client = MqttClient(options, on_message=on_message, subscriptions=((topic, 1),))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await client.start()
    try:
        await stop.wait()
    finally:
        await client.stop()
        store.close()
    return 0
