"""With no token configured (loopback only) the page is open like the API's reads, and the
login form just leads to it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp

from dgdm.sync.broker import Broker
from dgdm.sync.coordinator.config import HttpSection
from dgdm.sync.coordinator.service import Coordinator
from tests.sync.conftest import Rig


async def test_without_a_token_the_page_is_open_and_login_redirects(
    mqtt_broker: Broker, tmp_path: Path, unique_id: str
) -> None:
    rig = Rig(mqtt_broker, tmp_path, unique_id)
    config = dataclasses.replace(rig.config(), http=HttpSection(bind="127.0.0.1", port=0))
    coordinator = Coordinator(config)
    await coordinator.start()
    rig.coordinator = coordinator
    try:
        base = f"http://127.0.0.1:{coordinator.http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/") as response:
                assert response.status == 200
                assert "/page/app.js" in await response.text()
            for method in ("GET", "POST"):
                async with http.request(method, base + "/login", allow_redirects=False) as r:
                    assert r.status == 303
                    assert r.headers["Location"] == "/"
                    assert "Set-Cookie" not in r.headers
    finally:
        await rig.close()
