"""The coordinator's typed configuration (`/etc/dgdm/coordinator.toml`, SPEC §7).

Loaded with `dgdm.sync.settings.load_settings`: TOML plus `DGDM__SECTION__KEY` overrides;
an unknown or invalid key stops start-up with a `ConfigError` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dgdm.sync.config_checks import (
    check_body_budget,
    check_broker_url,
    check_private_key,
    check_tls_files,
    check_writable_dir,
)
from dgdm.sync.settings import (
    BROKER_URL_HINT,
    BROKER_URL_PATTERN,
    HOST_NAME_HINT,
    HOST_NAME_PATTERN,
    load_settings,
    setting,
)

DEFAULT_PATH = Path("/etc/dgdm/coordinator.toml")
MIB = 1024 * 1024


@dataclass(frozen=True)
class CoordinatorSection:
    id: str = setting("coordinator", pattern=r"[A-Za-z0-9._-]{1,64}")
    data_dir: Path = Path("/var/lib/dgdm-coordinator")
    private_key: Path = Path("/etc/dgdm/coordinator.key")
    receipt_interval_ms: int = setting(200, minimum=1, maximum=60_000)
    receipt_batch: int = setting(500, minimum=1, maximum=100_000)
    max_envelope_bytes: int = setting(16 * MIB, minimum=1024)
    # The largest result body (inflated JSON) accepted: embeddings are nodes x features x 4
    # bytes in base64 (x 4/3) plus node ids; 32 MiB holds 100,000 nodes x 48 features.
    max_result_body_bytes: int = setting(32 * MIB, minimum=64 * 1024, maximum=1024 * MIB)


@dataclass(frozen=True)
class IngestSection:
    """Fair share between devices (per-device quotas and queue bounds, see quota.py and
    fairqueue.py). Rates are per device; a device's message over its rate is dropped without
    a receipt and resent by the device later. The telemetry rate leaves room for a box that
    drains a week of offline backlog (one batch a minute) in well under an hour."""

    result_per_s: float = setting(2000.0, minimum=0.01)
    telemetry_per_s: float = setting(20.0, minimum=0.01)
    alert_per_s: float = setting(20.0, minimum=0.01)
    reply_per_s: float = setting(200.0, minimum=0.01)
    bytes_per_s: int = setting(8 * MIB, minimum=1024)
    # A bucket holds this many seconds of its rate (at least 100 messages / 1 MiB).
    burst_s: float = setting(30.0, minimum=1.0, maximum=3600.0)
    device_queue_messages: int = setting(2_000, minimum=1)
    device_queue_bytes: int = setting(8 * MIB, minimum=64 * 1024)
    queue_messages: int = setting(200_000, minimum=100)
    queue_bytes: int = setting(128 * MIB, minimum=MIB)
    # One store transaction holds at most receipt_batch messages and about this much work.
    batch_work_ms: int = setting(200, minimum=10, maximum=10_000)
    batch_bytes: int = setting(16 * MIB, minimum=64 * 1024)
    flooding_alert_s: float = setting(300.0, minimum=1.0)


@dataclass(frozen=True)
class MqttSection:
    broker_url: str = setting(
        "mqtt://127.0.0.1:1883", pattern=BROKER_URL_PATTERN, pattern_hint=BROKER_URL_HINT
    )
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = setting(None, secret=True)
    mqtt_version: Literal["5", "3.1.1"] = setting("5")
    # "paho" is the stock paho-mqtt wire, for a broker quirk the lean one meets (mqtt_wire.py).
    wire: Literal["lean", "paho"] = setting("lean")
    client_id: str | None = setting(None, pattern=r"[A-Za-z0-9._-]{1,64}")
    # Coordinators sharing a group split the traffic. A persistent session of a stopped
    # member keeps its share (the broker queues for it) until it expires or comes back.
    share_group: str = setting("dgdm", pattern=r"[A-Za-z0-9._-]{1,64}")
    # Short, unlike a device's week: a coordinator restarted within this resumes its queued
    # share; one gone longer leaves the group, so the others get all new traffic, and what
    # was queued for it is resent by the devices after `receipt_timeout_s` (it de-duplicates).
    session_expiry_s: int = setting(60, minimum=0, maximum=7 * 24 * 3600)


@dataclass(frozen=True)
class HttpSection:
    bind: str = setting("127.0.0.1", pattern=HOST_NAME_PATTERN, pattern_hint=HOST_NAME_HINT)
    port: int = setting(8090, minimum=0, maximum=65535)
    token: str | None = setting(None, secret=True)
    # The same bounds as the agent's [http] (sync/http_limits.py). A connection must send a
    # request's headers within this of opening or of its last response; an idle keep-alive
    # connection is closed after it too.
    header_timeout_s: float = setting(5.0, minimum=0.1, maximum=3600.0)
    # After the first second a body must arrive at least this fast (a deadline by size).
    body_min_bytes_per_s: int = setting(64 * 1024, minimum=1)
    # Open connections: in total (also kept below the open-file limit) and per peer
    # address; past a cap the longest idle one of its scope is closed.
    max_connections: int = setting(1000, minimum=1)
    max_connections_per_peer: int = setting(256, minimum=1)
    # Request body bytes buffered across all requests; 0: 256 MiB or 1/8 of the memory.
    max_inflight_body_bytes: int = setting(0, minimum=0)


@dataclass(frozen=True)
class StoreSection:
    """SPEC §7.1; opened by `stores.open_store`. The URL never holds the password."""

    # Unset: SQLite at <coordinator.data_dir>/coordinator.db.
    url: str | None = None
    # Not in repr either, so a logged or printed config never shows it.
    password: str | None = field(default=None, repr=False, metadata={"secret": True})
    retention_days: int = setting(30, minimum=1, maximum=100 * 365)
    # Per kind (0: retention_days). Commands and quarantined messages follow retention_days.
    telemetry_retention_days: int = setting(0, minimum=0, maximum=100 * 365)
    result_retention_days: int = setting(0, minimum=0, maximum=100 * 365)
    alert_retention_days: int = setting(0, minimum=0, maximum=100 * 365)
    # Telemetry older than this keeps one message per device per downsample_minutes
    # (0: never downsampled).
    downsample_after_days: int = setting(7, minimum=0, maximum=100 * 365)
    downsample_minutes: int = setting(15, minimum=1, maximum=24 * 60)
    # Stored message bytes per device; beyond it the device's oldest telemetry, then
    # alerts, then results are pruned (0: no quota). See housekeeping.py.
    device_quota_bytes: int = setting(1024 * MIB, minimum=0)
    housekeeping_interval_s: float = setting(60.0, minimum=1.0, maximum=24 * 3600.0)
    # Rows per housekeeping transaction: small, so ingest never waits long behind one.
    prune_batch: int = setting(1000, minimum=1, maximum=100_000)


@dataclass(frozen=True)
class CoordinatorConfig:
    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    http: HttpSection = field(default_factory=HttpSection)
    store: StoreSection = field(default_factory=StoreSection)
    ingest: IngestSection = field(default_factory=IngestSection)


def load_config(
    path: Path | str | None = None, *, env: dict[str, str] | None = None
) -> CoordinatorConfig:
    """Read the config; a missing default file means all defaults (plus env overrides)."""
    explicit = path is not None
    return load_settings(
        CoordinatorConfig, path if explicit else DEFAULT_PATH, env=env, require_file=explicit
    )


def validate(config: CoordinatorConfig, env: Mapping[str, str] | None = None) -> None:
    """What the running coordinator parses later, checked before it starts (the CLI calls
    this after `load_config`; configs built in code may name files still to be written)."""
    check_writable_dir("coordinator.data_dir", config.coordinator.data_dir)
    check_private_key("coordinator.private_key", config.coordinator.private_key)
    check_broker_url("mqtt.broker_url", config.mqtt.broker_url)
    check_tls_files("mqtt", config.mqtt)
    check_body_budget("http.max_inflight_body_bytes", config.http.max_inflight_body_bytes)
    validate_store(config, env)


def validate_store(config: CoordinatorConfig, env: Mapping[str, str] | None = None) -> None:
    """`[store]` as `stores.open_store` reads it, without opening it: the URL's form, a
    SQLite file's directory, a PostgreSQL password reference (`dgdm coordinator devices`
    needs only this part)."""
    from dgdm.sync.coordinator.stores import parse_store_url, resolve_password

    target = parse_store_url(config.store.url, config.coordinator.data_dir)
    if target.path is not None:
        # Unset, the file is in coordinator.data_dir: then that is the key to fix.
        key = "store.url" if config.store.url else "coordinator.data_dir"
        check_writable_dir(key, target.path.parent)
    else:
        resolve_password(config.store.password, env)
