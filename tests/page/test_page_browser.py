"""The fleet page in a real headless chromium against a real coordinator with devices
(conftest.py): what a person sees, that a device's strings stay text, and that without the
token there is nothing to see. Screenshots go to test-artifacts/page/ (or $DGDM_ARTIFACTS)."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from tests.page.cdp import Browser, Page
from tests.page.conftest import HOSTILE, PARIS_RESULTS, Fleet, log_in

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROWS = "[...document.querySelectorAll('tr.device-row')].map(r => r.dataset.device)"


def device_hash(device_id: str) -> str:
    return "#/device/" + urllib.parse.quote(device_id, safe="")


async def show(page: Page, fleet: Fleet, hash_route: str) -> None:
    """Route by hash, as a click on a link would, and wait for that view's first render."""
    await page.evaluate("document.getElementById('view').replaceChildren()")
    await page.evaluate(
        f"location.hash === {hash_route!r} ? refresh() : (location.hash = {hash_route!r})"
    )
    await page.wait_for("document.getElementById('view').childElementCount > 0")


async def test_the_fleet_table_shows_every_device_and_its_state(
    session: Page, fleet: Fleet
) -> None:
    await show(session, fleet, "#/")
    await session.wait_for(f"{ROWS}.length === 3")
    assert sorted(await session.evaluate(ROWS)) == sorted(fleet.ids.values())
    cells = await session.evaluate(
        "Object.fromEntries([...document.querySelectorAll('tr.device-row')]"
        ".map(r => [r.dataset.device, [...r.cells].map(c => c.textContent)]))"
    )
    berlin, spare = cells[fleet.ids["berlin"]], cells[fleet.ids["spare"]]
    assert berlin[2] == "online"
    assert spare[2] == "offline"
    assert berlin[1] == "hw=usbsite=berlin"  # two tag chips
    assert berlin[4] == "test"  # agent version from the device's status
    assert berlin[5] == "numpy"
    assert berlin[6] == "62.5 °C"  # the last sample's TPU temperature
    assert cells[fleet.ids["paris"]][6] == "none"  # no TPU
    assert berlin[7] == "3 (3 dropped)"  # outbox depth and drops
    assert berlin[8].startswith(f"injected: {HOSTILE}")
    assert cells[fleet.ids["paris"]][8].startswith("backend_fallback: cpu")
    await session.screenshot(fleet.artifacts / "fleet.png")


async def test_the_state_filter_keeps_only_matching_devices(session: Page, fleet: Fleet) -> None:
    await show(session, fleet, "#/?state=offline")
    await session.wait_for(f"{ROWS}.length === 1")
    assert await session.evaluate(ROWS) == [fleet.ids["spare"]]
    assert await session.evaluate("document.getElementById('filter-state').value") == "offline"
    await show(session, fleet, "#/?state=online")
    await session.wait_for(f"{ROWS}.length === 2")
    assert sorted(await session.evaluate(ROWS)) == sorted([fleet.ids["berlin"], fleet.ids["paris"]])


async def test_the_tag_filter_asks_the_api_for_those_tags(session: Page, fleet: Fleet) -> None:
    await show(session, fleet, "#/?tag=site=berlin")
    await session.wait_for(f"{ROWS}.length === 2")
    assert sorted(await session.evaluate(ROWS)) == sorted([fleet.ids["berlin"], fleet.ids["spare"]])
    await show(session, fleet, "#/?tag=site=berlin&tag=hw=usb")
    await session.wait_for(f"{ROWS}.length === 1")
    assert await session.evaluate(ROWS) == [fleet.ids["berlin"]]
    assert await session.evaluate("document.getElementById('filter-tag').value") == (
        "site=berlin, hw=usb"
    )
    # typed into the filter, as a person would: the hash (a link to this view) follows
    await session.evaluate(
        "const f = document.getElementById('filter-tag'); f.value = 'site=paris';"
        " f.dispatchEvent(new Event('change'))"
    )
    await session.wait_for(f"{ROWS}.length === 1 && {ROWS}[0] === {fleet.ids['paris']!r}")
    assert await session.evaluate("location.hash") == "#/?tag=site%3Dparis"
    await show(session, fleet, "#/?tag=Bad Key=x")
    error = await session.wait_for("document.querySelector('.filter-error')?.textContent")
    assert error.startswith("/devices?tag=Bad+Key%3Dx: ")  # the API's sentence about the tag
    assert await session.evaluate("document.getElementById('filter-tag').value") == "Bad Key=x"


async def test_the_device_page_charts_telemetry_and_lists_alerts_results_commands(
    session: Page, fleet: Fleet
) -> None:
    berlin = fleet.ids["berlin"]
    await show(session, fleet, device_hash(berlin))
    await session.wait_for("document.querySelector('.device-id') !== null")
    assert await session.evaluate("document.querySelector('.device-id').textContent") == berlin
    points = await session.evaluate(
        "Object.fromEntries([...document.querySelectorAll('svg.chart')].map(s => ["
        " s.dataset.series, (s.querySelector('polyline')?.getAttribute('points') || '')"
        ".split(' ').filter(Boolean).length]))"
    )
    assert points["tpu_temp"] == 30
    assert points["outbox_depth"] == 30
    assert points["latency_p50"] == 30
    assert points["diffusion_rate"] == 29  # a rate needs two samples
    # Plotted on the coordinator's clock: the device's clock step does not fold the chart.
    xs = await session.evaluate(
        "(document.querySelector('svg.chart[data-series=tpu_temp] polyline')"
        ".getAttribute('points')).split(' ').map(p => Number(p.split(',')[0]))"
    )
    assert xs == sorted(xs)
    assert len(set(xs)) == len(xs)
    results = await session.evaluate("document.body.innerText")
    assert "job-0" in results
    assert "job-2" in results
    assert "TPU at 81 C" in results
    commands = await session.evaluate(
        "[...document.querySelectorAll('tr.command-row')].map(r => r.textContent)"
    )
    assert len(commands) == 2  # the fixture's ping and the job's
    assert all('"cmd":"ping"' in c for c in commands)
    assert all("<b>not bold</b>" in c for c in commands)  # the reply, as text
    assert await session.evaluate("document.querySelectorAll('#view b').length") == 0
    await session.screenshot(fleet.artifacts / "device.png")


async def test_the_results_are_the_latest_once_the_page_has_caught_up(
    session: Page, fleet: Fleet
) -> None:
    """Results are read oldest first, 1000 a poll: the page says it is catching up until
    it has read them all, then shows the newest first."""
    await show(session, fleet, device_hash(fleet.ids["paris"]))
    heading = "[...document.querySelectorAll('h2')].map(h => h.textContent).join('|')"
    assert "Results (catching up: 1000 read" in await session.wait_for(heading)
    await session.wait_for(f"{heading}.includes('Results (latest 10)')", timeout=20)
    jobs = await session.evaluate(
        "[...document.querySelectorAll('tr.result-row')].map(r => r.cells[1].textContent)"
    )
    assert jobs == [f"job-{n}" for n in range(PARIS_RESULTS - 1, PARIS_RESULTS - 11, -1)]


async def test_a_hostile_alert_shows_as_text_and_never_runs(session: Page, fleet: Fleet) -> None:
    await show(session, fleet, device_hash(fleet.ids["berlin"]))
    await session.wait_for("document.querySelector('tr.alert-row') !== null")
    texts = await session.evaluate(
        "[...document.querySelectorAll('tr.alert-row td:last-child')].map(c => c.textContent)"
    )
    assert HOSTILE in texts
    assert (
        await session.evaluate("document.querySelectorAll('#view img, #view script').length") == 0
    )
    assert await session.evaluate("window.__pwned === undefined")
    # the fleet table's "last alert" column is text too
    await show(session, fleet, "#/")
    await session.wait_for(f"{ROWS}.length === 3")
    assert (
        await session.evaluate("document.querySelectorAll('#view img, #view script').length") == 0
    )
    assert await session.evaluate("window.__pwned === undefined")


async def test_without_a_session_the_page_is_a_login_form_with_no_data(
    browser: Browser, fleet: Fleet
) -> None:
    page = await browser.page()
    try:
        await page.goto(fleet.base + "/")
        await page.wait_for("document.getElementById('token') !== null")
        dom = await page.dom()
        assert not any(device_id in dom for device_id in fleet.ids.values())
        status = await page.evaluate("fetch('/devices').then(r => r.status)")
        assert status == 401
        await log_in(page, fleet.base, token="not-the-token")
        await page.wait_for("document.querySelector('p.error')?.textContent.length > 0")
        dom = await page.dom()
        assert "not this coordinator" in dom
        assert not any(device_id in dom for device_id in fleet.ids.values())
        await page.screenshot(fleet.artifacts / "login-refused.png")
    finally:
        await page.close()


async def test_log_out_ends_the_session(browser: Browser, fleet: Fleet) -> None:
    page = await browser.page()
    try:
        await log_in(page, fleet.base)
        await page.wait_for("document.querySelector('tr.device-row') !== null")
        await page.evaluate("document.querySelector('#logout button').click()")
        await page.wait_for("document.getElementById('token') !== null")
        await page.goto(fleet.base + "/")
        await page.wait_for("document.getElementById('token') !== null")
        assert await page.evaluate("fetch('/devices').then(r => r.status)") == 401
    finally:
        await page.close()


async def test_the_session_reads_but_can_never_send_a_command(session: Page, fleet: Fleet) -> None:
    berlin = fleet.ids["berlin"]
    assert await session.evaluate("document.cookie") == ""  # HttpOnly: no script sees it
    body = json.dumps({"cmd": "ping"})
    status = await session.evaluate(
        f"fetch('/devices/{berlin}/commands', {{method: 'POST', body: {body!r},"
        " headers: {'Content-Type': 'application/json'}}).then(r => r.status)"
    )
    assert status == 401
    assert await fleet.coordinator.command(berlin, fleet.command_seq + 1) is None
    assert await session.evaluate("fetch('/devices').then(r => r.status)") == 200


async def test_the_jobs_view_shows_progress_by_state(session: Page, fleet: Fleet) -> None:
    await show(session, fleet, "#/jobs")
    await session.wait_for("document.querySelector('tr.job-row') !== null")
    bar = (
        "Object.fromEntries([...document.querySelectorAll('{row} svg.bar rect[data-state]')]"
        ".map(r => [r.dataset.state, Number(r.dataset.count)]))"
    )
    row = f'tr.job-row[data-job="{fleet.job_id}"]'
    assert await session.evaluate(bar.format(row=row)) == {"succeeded": 1, "queued": 1}
    text = await session.evaluate(f"document.querySelector({row!r}).textContent")
    assert "ping" in text
    assert "site=berlin" in text
    await session.screenshot(fleet.artifacts / "jobs.png")
    await show(session, fleet, f"#/jobs/{fleet.job_id}")
    await session.wait_for("document.querySelector('tr.target-row') !== null")
    states = await session.evaluate(
        "Object.fromEntries([...document.querySelectorAll('tr.target-row')]"
        ".map(r => [r.dataset.device, r.cells[1].textContent]))"
    )
    assert states == {fleet.ids["berlin"]: "succeeded", fleet.ids["spare"]: "queued"}
    assert await session.evaluate(bar.format(row="#view")) == {"succeeded": 1, "queued": 1}
    await session.screenshot(fleet.artifacts / "job.png")


async def test_a_hostile_device_id_in_the_link_shows_as_text(session: Page, fleet: Fleet) -> None:
    await show(session, fleet, device_hash(HOSTILE))
    text = await session.wait_for("document.querySelector('#view .empty')?.textContent")
    assert text == f"No device {HOSTILE} is enrolled."
    assert (
        await session.evaluate("document.querySelectorAll('#view img, #view script').length") == 0
    )
    assert await session.evaluate("window.__pwned === undefined")


async def test_every_view_renders_within_the_content_security_policy(
    session: Page, fleet: Fleet
) -> None:
    """No inline script or style anywhere (the policy would block it and say so)."""
    for route in ("#/", device_hash(fleet.ids["berlin"]), "#/jobs", f"#/jobs/{fleet.job_id}"):
        await show(session, fleet, route)
        await session.wait_for("document.querySelector('#view table') !== null")
    assert await session.evaluate("window.__csp") == []
    styles = await session.evaluate("document.querySelectorAll('[style], style').length")
    assert styles == 0
    # the check itself works: an inline script is blocked and reported
    await session.evaluate(
        "const s = document.createElement('script'); s.textContent = 'window.__ran = 1';"
        " document.body.append(s)"
    )
    assert "inline" in await session.wait_for("window.__csp.join(' ')")
    assert await session.evaluate("window.__ran === undefined")
    await session.evaluate("window.__csp = []")
