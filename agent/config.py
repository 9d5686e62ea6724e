"""The agent's configuration schema (SPEC §7): typed, frozen, validated at start-up.

Loading is `dgdm.sync.settings.load_settings` (TOML + `DGDM__SECTION__KEY` overrides); this
module only declares the sections and the checks that span several keys. Any problem raises
`ConfigError` naming the key, which the CLI turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dgdm.sync.config_checks import (
    check_broker_url,
    check_private_key,
    check_public_key,
    check_tls_files,
    check_writable_dir,
)
from dgdm.sync.errors import ConfigError
from dgdm.sync.settings import (
    BROKER_URL_HINT,
    BROKER_URL_PATTERN,
    HOST_NAME_HINT,
    HOST_NAME_PATTERN,
    is_loopback,
    load_settings,
    setting,
)

DEFAULT_PATH = Path("/etc/dgdm/agent.toml")
MIB = 1 << 20
DEVICE_ID_PATTERN = r"[A-Za-z0-9._-]{1,64}"
DEFAULT_DATA_DIR = Path("/var/lib/dgdm")
DEFAULT_PRIVATE_KEY = Path("/etc/dgdm/device.key")


@dataclass(frozen=True)
class DeviceSettings:
    id: str = setting("edge-0001", pattern=DEVICE_ID_PATTERN)
    data_dir: Path = DEFAULT_DATA_DIR
    private_key: Path = DEFAULT_PRIVATE_KEY


@dataclass(frozen=True)
class HttpSettings:
    bind: str = setting("127.0.0.1", pattern=HOST_NAME_PATTERN, pattern_hint=HOST_NAME_HINT)
    port: int = setting(8080, minimum=0, maximum=65535)
    token: str | None = setting(None, secret=True)
    max_body_bytes: int = setting(64 * MIB, minimum=1024)
    # Host names (besides loopback ones and the bind address) requests may be addressed to.
    allowed_hosts: tuple[str, ...] = ()
    # A connection must send a request's headers within this of opening or of its last
    # response; an idle keep-alive connection is closed after it too.
    header_timeout_s: float = setting(5.0, minimum=0.1, maximum=3600.0)
    # After the first second a body must arrive at least this fast (a deadline by size).
    body_min_bytes_per_s: int = setting(64 * 1024, minimum=1)
    # Open connections: in total (also kept below the open-file limit) and per peer
    # address; past a cap the longest idle one of its scope is closed.
    max_connections: int = setting(1000, minimum=1)
    max_connections_per_peer: int = setting(256, minimum=1)
    # Request body bytes buffered across all requests; 0: 256 MiB or 1/8 of the memory.
    max_inflight_body_bytes: int = setting(0, minimum=0)
    # Processes accepting on the port (SO_REUSEPORT): the agent and processes - 1 serving
    # processes that answer OIP infer and model routes and pass everything else on to it.
    processes: int = setting(1, minimum=1, maximum=64)


@dataclass(frozen=True)
class SyncSettings:
    broker_url: str | None = setting(None, pattern=BROKER_URL_PATTERN, pattern_hint=BROKER_URL_HINT)
    coordinator_public_key: str | None = setting(None)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = setting(None)
    password: str | None = setting(None, secret=True)
    mqtt_version: Literal["5", "3.1.1"] = setting("5")
    # "paho" is the stock paho-mqtt wire, for a broker quirk the lean one meets (mqtt_wire.py).
    wire: Literal["lean", "paho"] = setting("lean")
    max_outbox_bytes: int = setting(256 * MIB, minimum=64 * 1024)
    encrypt_telemetry: bool = setting(True)
    receipt_timeout_s: float = setting(60.0, minimum=1.0, maximum=86400.0)
    offline_alert_s: float = setting(300.0, minimum=1.0)
    bandwidth_bytes_per_s: int = setting(0, minimum=0)
    # `clock_skew` above this offset to the coordinator's clock (SPEC §6.1), cleared at half.
    max_clock_skew_ms: int = setting(5000, minimum=1, maximum=7 * 86_400_000)


@dataclass(frozen=True)
class KernelsSettings:
    backend: Literal["auto", "edgetpu", "tflite", "numpy", "sparse"] = setting("auto")
    cache_dir: Path | None = None
    workers: int = setting(1, minimum=1, maximum=64)
    queue_size: int = setting(64, minimum=0, maximum=100_000)
    max_nodes: int = setting(100_000, minimum=1)
    max_edges: int = setting(2_000_000, minimum=0)
    max_features: int = setting(1024, minimum=1)
    # Registered topologies (PUT /graphs/{id}), kept in memory and in cache_dir: bounded
    # so that a local client cannot fill either, and start-up stays quick.
    max_topologies: int = setting(64, minimum=0)
    max_topology_bytes: int = setting(256 * MIB, minimum=0)
    # Concurrent OIP requests on one topology within this window share one backend call.
    batch_window_us: int = setting(200, minimum=0, maximum=1_000_000)
    # Every diffusion ends by this many seconds after its request arrived (504 past it); a
    # request may ask for less with ?deadline_s=.
    deadline_s: float = setting(30.0, minimum=0.01, maximum=86400.0)
    # A diffusion whose estimated working memory would pass this is refused (413) before
    # any work; 0: unbounded.
    max_diffusion_bytes: int = setting(768 * MIB, minimum=0)
    # The engine's caches of built runners and one-off operators, by estimated bytes.
    cache_bytes: int = setting(256 * MIB, minimum=0)
    # Workers of the lane for diffusions the cost model calls heavy, beside `workers`; at
    # most min(queue_size, 4) heavy ones wait.
    heavy_workers: int = setting(1, minimum=1, maximum=16)
    # Threads of one large diffusion's compiled series (N >= 10,000); 0: the CPUs the
    # process may use (its affinity, e.g. systemd's CPUAffinity=).
    threads: int = setting(0, minimum=0, maximum=64)


@dataclass(frozen=True)
class TelemetrySettings:
    interval_s: float = setting(10.0, minimum=0.05, maximum=3600.0)
    batch_s: float = setting(60.0, minimum=0.05, maximum=86400.0)


@dataclass(frozen=True)
class TpuSettings:
    temperature_limit_c: float = setting(85.0, minimum=20.0, maximum=150.0)
    # Diffusion returns to the TPU only this far below the limit, so it does not flap.
    hysteresis_c: float = setting(5.0, minimum=0.0, maximum=50.0)
    poll_s: float = setting(5.0, minimum=0.05, maximum=3600.0)


@dataclass(frozen=True)
class AlertsSettings:
    disk_min_free_bytes: int = setting(512 * MIB, minimum=0)
    # The same condition is re-announced no more often than this while it lasts.
    repeat_s: float = setting(3600.0, minimum=1.0)
    max_per_minute: int = setting(20, minimum=1)


@dataclass(frozen=True)
class SpoolSettings:
    dir: Path | None = None
    poll_s: float = setting(2.0, minimum=0.05, maximum=3600.0)


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = setting("info")


@dataclass(frozen=True)
class AgentConfig:
    device: DeviceSettings = field(default_factory=DeviceSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    kernels: KernelsSettings = field(default_factory=KernelsSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    tpu: TpuSettings = field(default_factory=TpuSettings)
    alerts: AlertsSettings = field(default_factory=AlertsSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    log: LogSettings = field(default_factory=LogSettings)


def load_config(path: Path | str | None, env: dict[str, str] | None = None) -> AgentConfig:
    """Load and check the agent config. An explicit `path` must exist; the default may not."""
    require = path is not None
    config = load_settings(AgentConfig, path or DEFAULT_PATH, env=env, require_file=require)
    check(config)
    return config


def validate(config: AgentConfig) -> None:
    """What the running agent parses later, checked before it starts (the CLI calls this
    after `load_config`; configs built in code, as by the demo, may name files to come)."""
    sync = config.sync
    check_writable_dir("device.data_dir", config.device.data_dir)
    if config.kernels.cache_dir is not None:
        check_writable_dir("kernels.cache_dir", config.kernels.cache_dir)
    if config.spool.dir is not None:
        check_writable_dir("spool.dir", config.spool.dir)
    if sync.coordinator_public_key:
        # The uplink is on only with a coordinator key; only then is the device key read.
        check_public_key("sync.coordinator_public_key", sync.coordinator_public_key)
        check_private_key("device.private_key", config.device.private_key)
    if sync.broker_url:
        check_broker_url("sync.broker_url", sync.broker_url)
    check_tls_files("sync", sync)


def check(config: AgentConfig) -> None:
    """Rules spanning several keys, each naming the key a user has to fix."""
    if not is_loopback(config.http.bind) and not config.http.token:
        raise ConfigError("http.token", "is required when http.bind is not a loopback address")
    if config.http.processes > 1 and config.kernels.backend == "edgetpu":
        raise ConfigError(
            "http.processes", "must be 1 with kernels.backend = 'edgetpu' (one process owns it)"
        )
    for i, name in enumerate(config.http.allowed_hosts):
        if not re.fullmatch(HOST_NAME_PATTERN, name):
            raise ConfigError(f"http.allowed_hosts[{i}]", HOST_NAME_HINT)
    sync = config.sync
    if sync.broker_url and not sync.coordinator_public_key:
        raise ConfigError("sync.coordinator_public_key", "is required when sync.broker_url is set")
    if (sync.cert_file is None) != (sync.key_file is None):
        raise ConfigError("sync.key_file", "sync.cert_file and sync.key_file go together")
    if sync.broker_url and sync.broker_url.startswith("mqtt://") and sync.ca_file:
        raise ConfigError("sync.ca_file", "is only used with an mqtts:// broker_url")
    if config.telemetry.batch_s < config.telemetry.interval_s:
        raise ConfigError("telemetry.batch_s", "must be >= telemetry.interval_s")


# Settings a SIGHUP may change in a running agent; anything else needs a restart.
RELOADABLE = frozenset(
    {
        "http.token",
        "log.level",
        "telemetry.interval_s",
        "telemetry.batch_s",
        "tpu.temperature_limit_c",
        "tpu.hysteresis_c",
        "tpu.poll_s",
        "alerts.disk_min_free_bytes",
        "alerts.repeat_s",
        "alerts.max_per_minute",
        "sync.offline_alert_s",
        "sync.max_clock_skew_ms",
        "spool.poll_s",
    }
)
