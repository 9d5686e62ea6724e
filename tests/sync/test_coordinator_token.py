"""A command acts on a box: the coordinator refuses POST /devices/{id}/commands unless an
API token is configured, even on loopback, where reads may be open."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp

from dgdm.sync.coordinator.config import HttpSection
from dgdm.sync.coordinator.service import Coordinator


async def test_commands_need_a_configured_token_even_on_loopback(
    sync_rig: Any, mqtt_broker: Any
) -> None:
    rig = sync_rig(mqtt_broker)
    device = rig.device("d")
    config = dataclasses.replace(rig.config(), http=HttpSection(bind="127.0.0.1", port=0))
    coordinator = Coordinator(config)
    await coordinator.start()
    rig.coordinator = coordinator
    await coordinator.add_device(device.device_id, device.public_b64)
    base = f"http://127.0.0.1:{coordinator.http_port}/devices"
    async with aiohttp.ClientSession() as http:
        async with http.get(base) as response:
            assert response.status == 200
        async with http.post(f"{base}/{device.device_id}/commands", json={"cmd": "ping"}) as r:
            assert r.status == 403
            assert (await r.json())["field"] == "http.token"
    assert await coordinator.command(device.device_id, 1) is None
