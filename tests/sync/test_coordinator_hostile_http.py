"""The coordinator's HTTP API against hostile input (issue 16 items 1, 13, 15): every answer is
a JSON 4xx, never a 500 or a traceback, never `NaN` or `Infinity` (which are not JSON).
A real coordinator on a real mosquitto, a real aiohttp server and client."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from dgdm.sync.coordinator.store import quarantine_record
from dgdm.sync.envelope import Kind

from .conftest import eventually


@pytest.fixture
async def api(sync_rig: Any, mqtt_broker: Any, rig_store: Any) -> Any:
    rig = sync_rig(mqtt_broker, rig_store)
    device = rig.device("d")
    coordinator = await rig.start_coordinator()
    base = f"http://127.0.0.1:{coordinator.http_port}/devices/{device.device_id}"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok"}) as http:
        yield http, base, coordinator, device


async def _json(response: aiohttp.ClientResponse) -> Any:
    # The API answers strict JSON: json.loads with NaN/Infinity refused.
    text = await response.text()

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in an API answer: {text[:200]}")

    return json.loads(text, parse_constant=refuse)


async def test_a_command_for_a_removed_device_is_a_404_not_a_500(api) -> None:
    http, base, coordinator, device = api
    assert coordinator.store.remove_device(device.device_id)
    coordinator.registry.reload()
    async with http.post(f"{base}/commands", json={"cmd": "ping"}) as response:
        body = await _json(response)
        assert response.status == 404, body
    assert body["field"] == "device_id"
    assert "not enrolled" in body["error"]


@pytest.mark.parametrize(
    "raw",
    [
        '{"cmd": "ping", "args": {"x": NaN}}',
        '{"cmd": "ping", "args": {"x": [Infinity]}}',
        '{"cmd": "ping", "args": {"x": -Infinity}}',
        '{"cmd": "ping", "args": {"x": 1e400}}',  # a float beyond double: inf
        '{"cmd": "ping", "ttl_ms": NaN}',
    ],
)
async def test_non_finite_numbers_in_a_command_body_are_a_400(api, raw) -> None:
    http, base, coordinator, device = api
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{base}/commands", data=raw, headers=headers) as response:
        body = await _json(response)
        assert response.status == 400, body
    assert body["field"] == "body"
    assert coordinator.store.command(device.device_id, 1) is None


@pytest.mark.parametrize("ttl", [2**64, 2**63, -1, 0, 1e400, "1", True, 1.5])
async def test_a_ttl_out_of_range_is_a_4xx(api, ttl) -> None:
    http, base, *_ = api
    raw = '{"cmd": "ping", "ttl_ms": ' + (json.dumps(ttl) if ttl != 1e400 else "1e400") + "}"
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{base}/commands", data=raw, headers=headers) as response:
        body = await _json(response)
        assert response.status in (400, 422), body
    assert body["field"] in ("ttl_ms", "body")


@pytest.mark.parametrize(
    "seq", [str(2**64), str(2**63), "-1", "0", "1e400", "9" * 5000, "nan", "%20"]
)
async def test_a_command_seq_out_of_range_is_a_404(api, seq) -> None:
    http, base, *_ = api
    async with http.get(f"{base}/commands/{seq}") as response:
        body = await _json(response)
        assert response.status == 404, body
    assert body["field"] == "seq"


@pytest.mark.parametrize(
    "query",
    [
        "since=18446744073709551616",
        "since=-1",
        "since=1e400",
        "limit=0",
        "limit=99999999999999999999",
    ],
)
async def test_result_paging_out_of_range_is_a_400(api, query) -> None:
    http, base, *_ = api
    async with http.get(f"{base}/results?{query}") as response:
        body = await _json(response)
        assert response.status == 400, body
    assert body["field"] == query.split("=")[0]


async def test_a_command_with_huge_integers_in_args_is_stored_and_answered(api) -> None:
    # Integers inside args are JSON (any size); they are not bound as SQL integers.
    http, base, coordinator, _ = api
    async with http.post(f"{base}/commands", json={"cmd": "ping", "args": {"n": 2**80}}) as r:
        body = await _json(r)
        assert r.status == 202, body
    async with http.get(f"{base}/commands/{body['seq']}") as r:
        got = await _json(r)
    assert got["command"]["args"] == {"n": 2**80}
    await eventually(lambda: coordinator.metrics.value("dgdm_commands_sent_total") >= 1)


async def test_the_quarantine_is_visible_per_device(api) -> None:
    http, base, coordinator, device = api
    record = quarantine_record(
        device.device_id, Kind.REPLY, 3, "malformed", message="cmd_seq beyond 64 bits", sample=b"{}"
    )
    # received now: housekeeping prunes quarantine rows past retention (1970 would be)
    coordinator.store.store_batch([], int(time.time() * 1000), [record])
    async with http.get(f"{base}/quarantine?limit=5") as response:
        body = await _json(response)
        assert response.status == 200, body
    (row,) = body["quarantine"]
    assert (row["kind"], row["seq"], row["reason"]) == ("reply", "3", "malformed")
    async with http.get(f"{base}/quarantine?limit=99999999999999999999") as response:
        assert response.status == 400
