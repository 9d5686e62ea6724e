"""One real coordinator (SQLite, a private mosquitto) with a few simulated devices that have
sent telemetry, alerts and results and answered a command, shared by the module's page
tests, and one headless chromium (cdp.py) to look at it.

Devices (ids prefixed with the rig's tag): `berlin` (site=berlin hw=usb; online, TPU, a
hostile alert), `paris` (site=paris; online, CPU only, a warning, 1050 results), `spare`
(site=berlin; enrolled, never connected: offline); one job, a ping to site=berlin (berlin
succeeded, spare still queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from dgdm.sync.broker import Broker
from dgdm.sync.coordinator.config import StoreSection
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.envelope import Kind
from tests.page.cdp import CHROMIUM, Browser, Page, artifacts_dir
from tests.sync.conftest import Rig

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok"  # the rig's [http] token
PARIS_RESULTS = 1050
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@dataclass
class Fleet:
    coordinator: Coordinator
    base: str
    ids: dict[str, str]  # short name -> device id
    command_seq: int  # berlin's last command (the job's ping after the fixture's own)
    job_id: int
    artifacts: Path


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# Halfway through, the device's clock steps back an hour (a box without a battery-backed
# clock, corrected by NTP the other way): `coord_ts_ms` (SPEC §6.1) carries on smoothly.
CLOCK_STEP_MS = -3_600_000


def samples(now_ms: int, n: int, *, tpu: bool, depth0: int) -> list[dict[str, Any]]:
    return [
        {
            "coord_ts_ms": now_ms - (n - i) * 5000,
            "ts_ms": now_ms - (n - i) * 5000 + (CLOCK_STEP_MS if i >= n // 2 else 0),
            "cpu_percent": 10.0 + i,
            "mem_used_bytes": 1 << 30,
            "mem_total_bytes": 4 << 30,
            "load1": 0.5,
            "disk_free_bytes": 10 << 30,
            "tpu": {"present": tpu, "temp_c": 48.0 + i * 0.5 if tpu else None},
            "outbox": {"messages": depth0 + i % 7, "bytes": 1000 * (depth0 + i % 7), "dropped": 3},
            "diffusions": 100 * i,
            "latency_p50_ms": 2.0 + (i % 5) * 0.25,
            "latency_p99_ms": 5.0,
        }
        for i in range(n)
    ]


def result_body(job: int) -> dict[str, Any]:
    return {
        "job_id": f"job-{job}",
        "graph_id": "karate",
        "method": "heat",
        "backend": "numpy",
        "latency_ms": 1.5,
        "error_bound": 0.0,
        "node_ids": ["a"],
        "embedding": {"dtype": "<f4", "shape": [1, 1], "b64": "AAAAAA=="},
    }


async def _pong(seq: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"pong": body.get("cmd"), "note": "<b>not bold</b>"}


async def _populate(rig: Rig) -> dict[str, str]:
    coordinator = rig.coordinator
    assert coordinator is not None
    berlin = rig.device("berlin", on_command=_pong)
    paris = rig.device("paris")
    spare = rig.device("spare")
    for device in (berlin, paris, spare):
        await rig.enrol(device)
    for device, tags in ((berlin, {"site": "berlin", "hw": "usb"}), (paris, {"site": "paris"})):
        assert await asyncio.to_thread(coordinator.store.tag, device.device_id, tags)
    assert await asyncio.to_thread(coordinator.store.tag, spare.device_id, {"site": "berlin"})
    await berlin.start()
    await paris.start()
    now = int(time.time() * 1000)
    berlin.enqueue(Kind.TELEMETRY, {"samples": samples(now, 30, tpu=True, depth0=2)})
    paris.enqueue(Kind.TELEMETRY, {"samples": samples(now, 12, tpu=False, depth0=0)})
    berlin.enqueue(Kind.ALERT, {"code": "tpu_hot", "severity": "warning", "message": "TPU at 81 C"})
    berlin.enqueue(
        Kind.ALERT, {"code": "injected", "severity": "critical", "message": HOSTILE, "details": {}}
    )
    paris.enqueue(Kind.ALERT, {"code": "backend_fallback", "severity": "warning", "message": "cpu"})
    for job in range(3):
        berlin.enqueue(Kind.RESULT, result_body(job))
    for job in range(PARIS_RESULTS):  # more than the page reads in one poll
        paris.enqueue(Kind.RESULT, result_body(job))
    seq = await coordinator.send_command(berlin.device_id, "ping", {}, 60_000)
    last_paris = f"job-{PARIS_RESULTS - 1}"

    async def landed() -> bool:
        command = await coordinator.command(berlin.device_id, seq)
        results = await coordinator.results_since(berlin.device_id, 0, 10)
        paris_results = await coordinator.results_since(paris.device_id, 1000, 1000)
        alerts = await coordinator.latest(paris.device_id, Kind.ALERT, 5)
        rows = {r["device_id"]: r for r in await coordinator.devices()}
        online = rows[berlin.device_id]["online"] and rows[paris.device_id]["online"]
        replied = command is not None and command["status"] == "replied"
        paris_done = paris_results and paris_results[-1]["body"]["job_id"] == last_paris
        return bool(replied and len(results) == 3 and paris_done and alerts and online)

    await until(landed, "telemetry, alerts, results and the reply stored")
    return {"berlin": berlin.device_id, "paris": paris.device_id, "spare": spare.device_id}


async def _start_job(coordinator: Coordinator, base: str) -> int:
    """A ping to site=berlin through the API: berlin answers, spare (offline) stays queued."""
    request = {"target": {"tags": {"site": "berlin"}}, "command": {"cmd": "ping"}}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "/jobs", json=request, headers=headers) as response,
    ):
        assert response.status == 201, await response.text()
        job_id = int((await response.json())["id"])

    async def decided() -> bool:
        job = await coordinator.job(job_id)
        return bool(job and job["counts"]["succeeded"] == 1)

    await until(decided, "the job's ping answered by berlin")
    return job_id


@contextlib.asynccontextmanager
async def running_fleet(
    broker: Broker, root: Path, tag: str, store: StoreSection | None = None
) -> AsyncIterator[Fleet]:
    rig = Rig(broker, root, tag, store)
    try:
        coordinator = await rig.start_coordinator()
        ids = await _populate(rig)
        base = f"http://127.0.0.1:{coordinator.http_port}"
        job_id = await _start_job(coordinator, base)
        (last,) = await coordinator.commands(ids["berlin"], 1)  # the job's ping
        yield Fleet(coordinator, base, ids, last["seq"], job_id, artifacts_dir(REPO))
    finally:
        await rig.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    mqtt_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    root = tmp_path_factory.mktemp("page-rig")
    async with running_fleet(mqtt_broker, root, f"pg{os.getpid()}") as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("no chromium: apt-get install chromium (tests/run installs it)")
    root = tmp_path_factory.mktemp("chromium")
    chromium = await Browser.launch(root / "profile", root / "chromium.log")
    try:
        yield chromium
    finally:
        await chromium.close()


async def log_in(page: Page, base: str, token: str = TOKEN) -> None:
    """Through the login form, as a person would."""
    await page.goto(base + "/login")
    await page.wait_for("document.getElementById('token') !== null")
    await page.evaluate(
        f"document.getElementById('token').value = {token!r}; document.forms[0].submit()"
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session(browser: Browser, fleet: Fleet) -> AsyncIterator[Page]:
    """A tab logged in to the fleet page; `window.__csp` collects any CSP violation."""
    page = await browser.page()
    await page.call("Page.enable")
    await page.call(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": "window.__csp = []; document.addEventListener('securitypolicyviolation',"
            " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI))"
        },
    )
    await log_in(page, fleet.base)
    await page.wait_for("document.querySelector('tr.device-row') !== null")
    try:
        yield page
    finally:
        await page.close()
