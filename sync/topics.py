"""MQTT topic names (SPEC §5): everything for a device lives under ``dgdm/v1/{device_id}/``."""

from __future__ import annotations

from dgdm.sync.envelope import TOPIC_SUFFIX, Kind, valid_device_id

PREFIX = "dgdm/v1"
SHARE_GROUP = "dgdm"
STATUS = "status"
UPLINK_KINDS = (Kind.RESULT, Kind.TELEMETRY, Kind.ALERT, Kind.REPLY)
_KIND_BY_SUFFIX = {suffix: kind for kind, suffix in TOPIC_SUFFIX.items()}


def device_topic(device_id: str, suffix: str) -> str:
    return f"{PREFIX}/{device_id}/{suffix}"


def kind_topic(device_id: str, kind: Kind) -> str:
    return device_topic(device_id, TOPIC_SUFFIX[kind])


def fleet_filter(suffix: str, *, shared: bool, group: str = SHARE_GROUP) -> str:
    """``dgdm/v1/+/suffix``; as an MQTT 5 shared subscription of `group` when `shared`."""
    base = f"{PREFIX}/+/{suffix}"
    return f"$share/{group}/{base}" if shared else base


def parse_topic(topic: str) -> tuple[str, str] | None:
    """(device_id, suffix) for a well-formed device topic, else None."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PREFIX or not valid_device_id(parts[2]):
        return None
    return parts[2], parts[3]


def kind_for_suffix(suffix: str) -> Kind | None:
    return _KIND_BY_SUFFIX.get(suffix)
