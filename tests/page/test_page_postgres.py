"""The fleet page on a coordinator with the PostgreSQL store (its own fleet-view SQL):
the same devices, the same table, device page and job, in the browser."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from dgdm.sync.broker import Broker
from dgdm.sync.coordinator.config import StoreSection
from tests.page.cdp import Page
from tests.page.conftest import HOSTILE, Fleet, running_fleet
from tests.page.test_page_browser import ROWS, device_hash, show

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    mqtt_broker: Broker, pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Fleet]:
    """Overrides conftest's `fleet` for this module (so `session` logs in here)."""
    store = StoreSection(
        url=pg_cluster.url(pg_cluster.create_database()), password="env:DGDM_TEST_PAGE_PG_PASSWORD"
    )
    root = tmp_path_factory.mktemp("page-rig-pg")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DGDM_TEST_PAGE_PG_PASSWORD", pg_cluster.password)
        async with running_fleet(mqtt_broker, root, f"pp{os.getpid()}", store) as running:
            yield running


async def test_the_page_shows_the_fleet_from_postgresql(session: Page, fleet: Fleet) -> None:
    await show(session, fleet, "#/?tag=site=berlin")
    await session.wait_for(f"{ROWS}.length === 2")
    cells = await session.evaluate(
        "Object.fromEntries([...document.querySelectorAll('tr.device-row')]"
        ".map(r => [r.dataset.device, [...r.cells].map(c => c.textContent)]))"
    )
    berlin = cells[fleet.ids["berlin"]]
    assert berlin[1:3] == ["hw=usbsite=berlin", "online"]
    assert berlin[6:8] == ["62.5 °C", "3 (3 dropped)"]
    assert berlin[8].startswith(f"injected: {HOSTILE}")
    await show(session, fleet, device_hash(fleet.ids["berlin"]))
    await session.wait_for("document.querySelectorAll('tr.command-row').length === 2")
    points = await session.evaluate(
        "document.querySelector('svg.chart[data-series=tpu_temp]').dataset.points"
    )
    assert points == "30"
    await show(session, fleet, f"#/jobs/{fleet.job_id}")
    await session.wait_for("document.querySelectorAll('tr.target-row').length === 2")
    assert await session.evaluate("window.__pwned === undefined")
