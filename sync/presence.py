"""Coordinator presence: the retained topic, its payloads, and when a device resends.

Each coordinator keeps a retained message on ``dgdm/coordinators/{coordinator_id}`` (outside
``dgdm/v1/``, so no device id can collide with it; devices may only read it):

    {"state": "online", "coordinator_id": "...", "incarnation": "<random per process>",
     "ts_ms": ...}

published at every connect; its will (the broker publishes it when the connection dies
without a DISCONNECT) says ``"state": "lost"``, and a clean stop publishes ``"offline"``
after the coordinator stored everything it had received.

Why devices care: a broker restart that lost its sessions drops whatever a device sends
before some coordinator subscribes again, and the broker PUBACKs it all the same. A device
resends everything unreceipted at its own reconnect; `PresenceView` says when it must also
resend later, on the message of one presence (`observe`):

- a retained message (delivered because the device just subscribed) is the state as of the
  device's connect: that coordinator was there already, so the reconnect resend reached it;
- a live ``online`` while no other coordinator is known online: the first coordinator
  after none. What the device sent meanwhile may have reached nobody: resend. A replica
  that joins or reconnects while another is online changes nothing (the shared
  subscription kept delivering to the other one), so a fleet does not resend for it;
- a live ``online`` of a new incarnation where the old one was online (it died and its
  will got lost): as for ``lost`` below;
- a live ``lost`` while another coordinator stays online: the lost one's in-memory batch
  (PUBACKed, not yet stored) is gone; the others take the resend now. Lost with none left
  online: nothing to resend to yet, the next ``online`` decides.

The device then waits a random 0-2 s (`resend_delay`: a fleet must not resend in the same
millisecond) and resends what it sent before the event and is still unreceipted.

Retained and live are told apart by the RETAIN flag on delivery: set only on what a broker
sends from its retained store at a subscribe (MQTT 3.1.1 and 5, §3.3.1.3, with Retain As
Published off); mosquitto, amqtt and aedes do so (tests/sync/test_link_interop.py).
The decisions (`parse`, `PresenceView`) are pure: bytes and flags in, decisions out;
`Announcer` is the coordinator's thin publishing side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from dgdm.sync.envelope import valid_device_id
from dgdm.sync.errors import TransportError
from dgdm.sync.wallclock import now_ms

PREFIX = "dgdm/coordinators"
FILTER = f"{PREFIX}/+"
STATES = ("online", "offline", "lost")
MAX_PAYLOAD_BYTES = 1024
MAX_TRACKED = 256  # coordinators remembered per connection: a bounded view of a hostile feed
RESEND_DELAY_MAX_S = 2.0
OFFLINE_ACK_TIMEOUT_S = 2.0


def topic(coordinator_id: str) -> str:
    return f"{PREFIX}/{coordinator_id}"


def new_incarnation() -> str:
    """Random per process start: tells a restarted coordinator from a reconnected one."""
    return secrets.token_hex(8)


def payload(state: str, coordinator_id: str, incarnation: str, ts_ms: int | None = None) -> bytes:
    body = {
        "state": state,
        "coordinator_id": coordinator_id,
        "incarnation": incarnation,
        "ts_ms": now_ms() if ts_ms is None else ts_ms,
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Presence:
    coordinator_id: str
    state: str
    incarnation: str


def parse(topic_name: str, data: bytes) -> Presence | None:
    """The presence on `topic_name`, or None for anything malformed (or an empty retained
    message: a presence cleared by an operator)."""
    parts = topic_name.split("/")
    if len(parts) != 3 or "/".join(parts[:2]) != PREFIX or not valid_device_id(parts[2]):
        return None
    if not data or len(data) > MAX_PAYLOAD_BYTES:
        return None
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    state, incarnation = body.get("state"), body.get("incarnation")
    if (
        state not in STATES
        or not isinstance(incarnation, str)
        or body.get("coordinator_id") != parts[2]
    ):
        return None
    return Presence(parts[2], state, incarnation[:64])


class PresenceView:
    """What one device connection knows of the coordinators, and when to resend."""

    def __init__(self) -> None:
        self._online: dict[str, str] = {}  # coordinator id -> incarnation

    @property
    def online(self) -> frozenset[str]:
        return frozenset(self._online)

    def connected(self) -> None:
        """A new connection of the device: the retained messages that follow are the state."""
        self._online.clear()

    def observe(self, presence: Presence, retained: bool) -> bool:
        """Record one presence message; True when the device should resend (module doc)."""
        cid = presence.coordinator_id
        others = len(self._online) - (cid in self._online)
        if presence.state == "online":
            if cid not in self._online and len(self._online) >= MAX_TRACKED:
                return False
            # Online again without a "lost" in between (the broker restarted and forgot the
            # will, say) but a new process: the old one's in-memory batch is gone.
            replaced = self._online.get(cid, presence.incarnation) != presence.incarnation
            self._online[cid] = presence.incarnation
            return not retained and (others == 0 or replaced)
        was_online = self._online.pop(cid, None) is not None
        return not retained and presence.state == "lost" and was_online and others > 0


def resend_delay() -> float:
    """Uniform in [0, RESEND_DELAY_MAX_S]: spreads a fleet's resends over two seconds."""
    return random.uniform(0.0, RESEND_DELAY_MAX_S)  # noqa: S311 - jitter, not cryptography


class Publisher(Protocol):
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> Awaitable[asyncio.Future[None]]: ...


class Announcer:
    """A coordinator's side: the will for its connect options (`will_payload`), `online()`
    as the client's on_connect handler, `offline()` at a clean stop. Set `client` before
    the client starts."""

    def __init__(self, coordinator_id: str) -> None:
        self.coordinator_id = coordinator_id
        self.topic = topic(coordinator_id)
        self.incarnation = new_incarnation()
        self.client: Publisher | None = None

    def payload(self, state: str) -> bytes:
        return payload(state, self.coordinator_id, self.incarnation)

    def will_payload(self) -> bytes:
        return self.payload("lost")

    async def online(self, _session_present: bool) -> None:
        """At every connect, after the subscriptions: devices may resend from now on."""
        if self.client is not None:
            with contextlib.suppress(TransportError):
                await self.client.publish(self.topic, self.payload("online"), retain=True)

    async def offline(self) -> None:
        """A clean stop, once everything received is stored: nothing of ours was lost."""
        if self.client is not None:
            with contextlib.suppress(TransportError, asyncio.TimeoutError):
                acked = await self.client.publish(self.topic, self.payload("offline"), retain=True)
                await asyncio.wait_for(acked, OFFLINE_ACK_TIMEOUT_S)
