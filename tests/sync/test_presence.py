"""Coordinator presence (presence.py): payloads, parsing, and when a device resends."""

from __future__ import annotations

import json

import pytest

from dgdm.sync import presence
from dgdm.sync.presence import Presence, PresenceView


def _p(cid: str, state: str = "online", inc: str = "i1") -> Presence:
    return Presence(cid, state, inc)


# Rows: the messages one device connection sees, as (presence, retained), each with the
# decision expected (True: resend what was sent before it).
TABLE = {
    "broker restarted without persistence, device first: the coordinator's reconnect": [
        ((_p("c1"), False), True),
    ],
    "device reconnects after the coordinator: the retained state is no event": [
        ((_p("c1"), True), False),
    ],
    "a second replica joins while the first is online: no fleet-wide resend": [
        ((_p("c1"), True), False),
        ((_p("c2"), False), False),
    ],
    "both replicas come back after a broker restart: only the first one counts": [
        ((_p("c1"), False), True),
        ((_p("c2"), False), False),
    ],
    "a replica reconnects (same process) while another is online": [
        ((_p("c1"), True), False),
        ((_p("c2"), True), False),
        ((_p("c2"), False), False),
    ],
    "the only coordinator is lost, then comes back (a new process)": [
        ((_p("c1"), True), False),
        ((_p("c1", "lost"), False), False),  # nobody to resend to yet
        ((_p("c1", "online", "i2"), False), True),
    ],
    "a replica is lost while another stays online: its batch is gone, resend now": [
        ((_p("c1"), True), False),
        ((_p("c2"), True), False),
        ((_p("c2", "lost"), False), True),
        ((_p("c2", "online", "i2"), False), False),  # back: the others had it meanwhile
    ],
    "a replica stops cleanly (stored all it had) while another is online": [
        ((_p("c1"), True), False),
        ((_p("c2"), True), False),
        ((_p("c2", "offline"), False), False),
        ((_p("c2", "online", "i2"), False), False),
    ],
    "a replica restarted and its will was lost: a new incarnation replaces an online one": [
        ((_p("c1"), True), False),
        ((_p("c2"), True), False),
        ((_p("c2", "online", "i2"), False), True),
    ],
    "the only coordinator stopped cleanly, then starts again": [
        ((_p("c1"), True), False),
        ((_p("c1", "offline"), False), False),
        ((_p("c1", "online", "i2"), False), True),
    ],
    "a retained offline of a gone replica is not an event": [
        ((_p("c9", "offline"), True), False),
        ((_p("c1"), True), False),
    ],
}


@pytest.mark.parametrize("name", list(TABLE))
def test_when_a_device_resends(name: str) -> None:
    view = PresenceView()
    view.connected()
    for (seen, retained), expected in TABLE[name]:
        assert view.observe(seen, retained) is expected, (name, seen, retained)


def test_a_reconnect_of_the_device_starts_from_the_retained_state_again() -> None:
    view = PresenceView()
    assert view.observe(_p("c1"), retained=True) is False
    view.connected()  # the broker restarted: nothing retained comes this time
    assert view.online == frozenset()
    assert view.observe(_p("c1"), retained=False) is True


def test_the_view_is_bounded() -> None:
    view = PresenceView()
    for i in range(presence.MAX_TRACKED + 50):
        view.observe(_p(f"c{i}"), retained=True)
    assert len(view.online) == presence.MAX_TRACKED


def test_payloads_round_trip_and_the_will_says_lost() -> None:
    announcer = presence.Announcer("coord-1")
    assert announcer.topic == "dgdm/coordinators/coord-1"
    body = json.loads(announcer.payload("online"))
    assert (body["state"], body["coordinator_id"]) == ("online", "coord-1")
    assert isinstance(body["ts_ms"], int)
    assert len(body["incarnation"]) == 16
    assert presence.parse(announcer.topic, announcer.will_payload()) == Presence(
        "coord-1", "lost", announcer.incarnation
    )
    assert presence.Announcer("coord-1").incarnation != announcer.incarnation


@pytest.mark.parametrize(
    ("topic", "data"),
    [
        ("dgdm/coordinators/c1", b""),  # cleared by an operator
        ("dgdm/coordinators/c1", b"not json"),
        ("dgdm/coordinators/c1", b"[1]"),
        ("dgdm/coordinators/c1", presence.payload("gone", "c1", "i")),
        ("dgdm/coordinators/c1", presence.payload("online", "c2", "i")),  # another's name
        ("dgdm/coordinators/c1", b'{"state":"online","coordinator_id":"c1","incarnation":1}'),
        ("dgdm/coordinators/c1", b" " * (presence.MAX_PAYLOAD_BYTES + 1)),
        ("dgdm/coordinators/c/1", presence.payload("online", "c", "i")),
        ("dgdm/v1/c1/status", presence.payload("online", "c1", "i")),
        ("dgdm/coordinators/bad id", presence.payload("online", "bad id", "i")),
    ],
)
def test_malformed_presence_is_ignored(topic: str, data: bytes) -> None:
    assert presence.parse(topic, data) is None
