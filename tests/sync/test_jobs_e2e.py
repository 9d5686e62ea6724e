"""Jobs end to end: a real coordinator (its job runner, its HTTP API) on a real mosquitto,
devices with real outboxes and links. A set_config job changes the telemetry interval of
one site, including a device that was offline when the job started; the failure gate
aborts a job (the metric counts it); a device that never answers times out and one that
never comes back runs out of TTL; cancel; the API's errors name their field."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import aiohttp

from dgdm.sync.coordinator.config import HttpSection
from dgdm.sync.coordinator.service import Coordinator
from dgdm.sync.envelope import Kind

from .conftest import Device, Rig, eventually, online

AUTH = {"Authorization": "Bearer tok"}


class SimulatedBox:
    """A device that sends telemetry every `interval_s` and takes `set_config` for it."""

    def __init__(self, rig: Rig, name: str) -> None:
        self.interval_s = 1.0
        self.calls: list[tuple[int, dict[str, Any]]] = []
        self.device: Device = rig.device(name, on_command=self.on_command)
        self._task: asyncio.Task[None] | None = None

    async def on_command(self, seq: int, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((seq, body))
        if body["cmd"] == "set_config":
            self.interval_s = float(body["args"]["telemetry"]["interval_s"])
            return {"applied": {"telemetry.interval_s": self.interval_s}}
        return {"pong": True}

    async def start(self) -> None:
        await self.device.start()
        self._task = asyncio.create_task(self._telemetry())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _telemetry(self) -> None:
        while True:
            sample = {"ts_ms": time.time_ns() // 1_000_000, "interval_s": self.interval_s}
            self.device.enqueue(Kind.TELEMETRY, {"samples": [sample]})
            await asyncio.sleep(self.interval_s)


async def _api(coordinator: Coordinator) -> Any:
    base = f"http://127.0.0.1:{coordinator.http_port}"
    session = aiohttp.ClientSession(headers=AUTH)

    async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with session.request(method, f"{base}{path}", json=body) as r:
            return r.status, await r.json()

    return session, call


async def _job_state(call: Any, job_id: int, state: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        _, job = await call("GET", f"/jobs/{job_id}")
        if job["state"] == state:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)


async def test_a_set_config_job_changes_a_sites_telemetry_interval(
    mqtt_broker, sync_rig, rig_store
) -> None:
    rig = sync_rig(mqtt_broker, rig_store)
    berlin = [SimulatedBox(rig, f"b{i}") for i in range(3)]
    paris = SimulatedBox(rig, "p")
    coordinator = await rig.start_coordinator()
    store = coordinator.store
    for box in berlin:
        await coordinator.run_on_writer(store.tag, box.device.device_id, {"site": "berlin"})
    await coordinator.run_on_writer(store.tag, paris.device.device_id, {"site": "paris"})
    late = berlin[2]  # offline when the job starts
    boxes = [*berlin[:2], paris]
    for box in boxes:
        await box.start()
    session, call = await _api(coordinator)
    try:
        await online(coordinator, *(b.device.device_id for b in boxes))
        status, job = await call(
            "POST",
            "/jobs",
            {
                "target": {"tags": {"site": "berlin"}},
                "command": {"cmd": "set_config", "args": {"telemetry": {"interval_s": 0.1}}},
                "rate_per_s": 20,
                "timeout_s": 10,
                "ttl_ms": 60_000,
            },
        )
        assert status == 201, job
        assert (job["state"], job["total"], job["counts"]["queued"]) == ("running", 3, 3)
        await eventually(lambda: all(b.calls for b in berlin[:2]), what="the online boxes")

        async def counts() -> dict[str, int]:
            return (await call("GET", f"/jobs/{job['id']}"))[1]["counts"]

        deadline = time.monotonic() + 15
        while (await counts())["succeeded"] < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await counts())["queued"] == 1  # the offline box waits for its return
        boxes.append(late)
        await late.start()
        done = await _job_state(call, job["id"], "completed")
        assert done["counts"]["succeeded"] == 3
        _, page = await call("GET", f"/jobs/{job['id']}?limit=2")
        assert [d["state"] for d in page["devices"]] == ["succeeded", "succeeded"]
        _, rest = await call("GET", f"/jobs/{job['id']}?limit=1&cursor={page['next']}")
        assert [d["device_id"] for d in rest["devices"]] == [late.device.device_id]
        assert rest["next"] is None  # a full last page says so too
        for box in berlin:  # each box ran the job's command once
            assert [b["cmd"] for _, b in box.calls] == ["set_config"]
            assert box.interval_s == 0.1
        assert paris.calls == []  # not in the target
        # The coordinator now receives the site's telemetry at the new interval.
        device_id = berlin[0].device.device_id

        async def fast() -> bool:
            _, history = await call("GET", f"/devices/{device_id}/telemetry?limit=5")
            rows = history["telemetry"]
            return len(rows) == 5 and all(
                r["body"]["samples"][0]["interval_s"] == 0.1 for r in rows
            )

        deadline = time.monotonic() + 10
        while not await fast():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        _, listed = await call("GET", "/jobs")
        assert [j["id"] for j in listed["jobs"]] == [job["id"]]
        assert coordinator.metrics.value("dgdm_coordinator_jobs_active") == 0
    finally:
        await session.close()
        for box in boxes:
            await box.stop()


async def test_gate_timeouts_ttl_and_cancel(mqtt_broker, sync_rig) -> None:
    rig = sync_rig(mqtt_broker)

    async def refuse(seq: int, body: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("not on this box")

    async def hang(seq: int, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    failing = [rig.device(f"f{i}", on_command=refuse) for i in range(6)]
    silent = rig.device("s", on_command=hang)
    absent = rig.device("a")  # never started
    coordinator = await rig.start_coordinator()
    for device in [*failing, silent]:
        await device.start()
    session, call = await _api(coordinator)
    try:
        await online(coordinator, *(d.device_id for d in failing), silent.device_id)
        ids = [d.device_id for d in failing]
        status, job = await call(
            "POST",
            "/jobs",
            {
                "target": {"ids": ids},
                "command": {"cmd": "ping"},
                "rate_per_s": 2,
                "max_failure_ratio": 0.5,
            },
        )
        assert status == 201
        aborted = await _job_state(call, job["id"], "aborted")
        assert aborted["counts"]["failed"] == 5  # the gate's sample of 5, all failed
        assert aborted["counts"]["cancelled"] == 1
        assert "failure gate" in aborted["reason"]
        _, failed = await call("GET", f"/jobs/{job['id']}")
        assert {d["error"] for d in failed["devices"] if d["state"] == "failed"} == {
            "not on this box"
        }
        assert coordinator.metrics.value("dgdm_coordinator_jobs_aborted_total") == 1
        async with session.get(f"http://127.0.0.1:{coordinator.http_port}/metrics") as r:
            assert "dgdm_coordinator_jobs_aborted_total 1.0" in await r.text()

        status, job = await call(
            "POST",
            "/jobs",
            {
                "target": {"ids": [silent.device_id, absent.device_id]},
                "command": {"cmd": "ping"},
                "timeout_s": 0.5,
                "ttl_ms": 1500,
                "max_failure_ratio": 1.0,
            },
        )
        done = await _job_state(call, job["id"], "completed")
        errors = {d["device_id"]: d["error"] for d in done["devices"]}
        assert done["counts"]["timed_out"] == 2
        assert errors[silent.device_id] == "no reply within timeout_s"
        assert "ttl_ms ran out" in errors[absent.device_id]

        status, job = await call(
            "POST", "/jobs", {"target": {"ids": [absent.device_id]}, "command": {"cmd": "ping"}}
        )
        status, cancelled = await call("POST", f"/jobs/{job['id']}/cancel")
        assert (status, cancelled["state"], cancelled["counts"]["cancelled"]) == (
            200,
            "cancelled",
            1,
        )
    finally:
        await session.close()


async def test_job_api_errors_name_the_field(mqtt_broker, sync_rig) -> None:
    rig = sync_rig(mqtt_broker)
    rig.device("d")  # enrolled: the "all" target has a device
    coordinator = await rig.start_coordinator()
    session, call = await _api(coordinator)
    good = {"target": "all", "command": {"cmd": "ping"}}
    try:
        for body, field in (
            ({**good, "target": "everyone"}, "target"),
            ({**good, "target": {"tags": {"site": "nowhere"}}}, "target"),
            ({**good, "target": {"ids": ["ghost"]}}, "target.ids"),
            ({**good, "target": {"tags": {"Bad": "x"}}}, "target.tags"),
            ({**good, "command": {"cmd": "reboot"}}, "command.cmd"),
            ({**good, "rate_per_s": -1}, "rate_per_s"),
            ({**good, "max_failure_ratio": 2}, "max_failure_ratio"),
            ({**good, "timeout_s": "soon"}, "timeout_s"),
            ({**good, "ttl_ms": 0}, "ttl_ms"),
            ([good], "body"),
        ):
            status, answer = await call("POST", "/jobs", body)
            assert (status, answer["field"]) == (422, field), (body, answer)
        async with session.post(f"http://127.0.0.1:{coordinator.http_port}/jobs", data=b"{") as r:
            assert (r.status, (await r.json())["field"]) == (400, "body")
        for method, path, code, field in (
            ("GET", "/jobs/12345", 404, "job_id"),
            ("GET", "/jobs/x", 404, "job_id"),
            ("GET", "/jobs/0", 404, "job_id"),
            ("POST", "/jobs/12345/cancel", 404, "job_id"),
            ("GET", "/jobs?limit=0", 400, "limit"),
        ):
            status, answer = await call(method, path)
            assert (status, answer["field"]) == (code, field), path
        status, job = await call("POST", "/jobs", good)
        assert status == 201
        status, answer = await call("GET", f"/jobs/{job['id']}?cursor=bad/id")
        assert (status, answer["field"]) == (400, "cursor")
    finally:
        await session.close()
    # Without a configured token, a job is refused (403) even on loopback.
    await rig.stop_coordinator()
    config = dataclasses.replace(rig.config(), http=HttpSection(bind="127.0.0.1", port=0))
    open_coordinator = Coordinator(config)
    await open_coordinator.start()
    rig.coordinator = open_coordinator
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{open_coordinator.http_port}"
        async with http.post(f"{base}/jobs", json=good) as r:
            assert (r.status, (await r.json())["field"]) == (403, "http.token")
        async with http.post(f"{base}/jobs/1/cancel") as r:
            assert r.status == 403
        async with http.get(f"{base}/jobs") as r:
            assert r.status == 200
            assert len((await r.json())["jobs"]) == 1  # the job above, from the store
