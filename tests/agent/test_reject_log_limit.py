"""Rejected incoming envelopes cost a hostile or broken peer one log line per reason per
minute, not one per envelope: the real agent on a real mosquitto gets 300 bad envelopes
on its cmd and receipt topics; its log holds one 'dropped envelope' line per reason, and
`dgdm_envelopes_rejected_total{reason}` counts every one. The limiter's count of what it
held back (a minute later) is checked on the pure limiter with a clock."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgdm.agent.logs import RepeatLimiter
from dgdm.sync.crypto import generate_keypair
from dgdm.sync.envelope import Kind, seal
from dgdm.sync.mqtt import MqttClient, MqttOptions

Agent = Any  # conftest.AgentProcess
DEVICE = "edge-reject-1"


def rejected(agent: Agent) -> dict[str, float]:
    text = agent.get("/metrics").body.decode()
    found = re.findall(r'^dgdm_envelopes_rejected_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)
    return {reason: float(value) for reason, value in found}


async def flood(broker: Any) -> None:
    client = MqttClient(MqttOptions(broker.url, f"attacker-{time.monotonic_ns()}", "5"))
    await client.start()
    await client.wait_connected(10)
    wrong_key = bytes(32)
    for i in range(100):
        await client.publish(f"dgdm/v1/{DEVICE}/cmd", b"\x00garbage" * 3)
        forged = seal(Kind.COMMAND, i + 1, int(time.time() * 1000), DEVICE, {"cmd": "ping"},
                      key=wrong_key, key_id=b"\x00" * 4)  # fmt: skip
        await client.publish(f"dgdm/v1/{DEVICE}/cmd", forged)
        await client.publish(f"dgdm/v1/{DEVICE}/receipt", b"not an envelope")
    await client.stop()


async def test_rejections_are_logged_once_per_reason_and_all_counted(
    mqtt_broker: Any, start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    dev_key, _, _ = generate_keypair(tmp_path / "keys", name="device")
    _, _, coord_b64 = generate_keypair(tmp_path / "keys", name="coordinator")
    agent = await asyncio.to_thread(
        start_agent,
        {
            "device": {"id": DEVICE, "private_key": str(dev_key)},
            "sync": {"broker_url": mqtt_broker.url, "coordinator_public_key": coord_b64},
            "kernels": {"backend": "numpy"},
        },
    )
    deadline = time.monotonic() + 15
    while not (await asyncio.to_thread(agent.get, "/status")).json()["broker"]["connected"]:
        assert time.monotonic() < deadline, "agent never connected"
        await asyncio.sleep(0.1)
    await flood(mqtt_broker)

    deadline = time.monotonic() + 15
    while sum((counts := await asyncio.to_thread(rejected, agent)).values()) < 300:
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.2)
    assert sum(counts.values()) == 300, counts
    assert len(counts) >= 2, counts  # garbage and a forged key: different reasons
    lines = [r for r in agent.logs() if r.get("msg", "").startswith("dropped envelope")]
    reasons = [r["msg"].split(": ", 1)[1].split(" ", 1)[0] for r in lines]
    assert sorted(reasons) == sorted(counts), lines  # one line per reason, not 300
    assert agent.proc.poll() is None


def test_the_limiter_lets_one_through_per_minute_and_counts_the_rest() -> None:
    limiter = RepeatLimiter(period_s=60.0, max_keys=2)
    assert limiter.allow("bad_tag", 0.0) == 0
    assert limiter.allow("bad_tag", 1.0) is None
    assert limiter.allow("bad_tag", 59.0) is None
    assert limiter.allow("malformed", 2.0) == 0  # another reason has its own minute
    assert limiter.allow("bad_tag", 60.5) == 2  # through again, with what it held back
    assert limiter.allow("bad_tag", 61.0) is None
    assert limiter.allow("other", 62.0) == 0  # a third key evicts the oldest: bounded
    assert len(limiter) == 2
