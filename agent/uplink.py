"""The agent's side of sync: link keys, the outbox of sealed messages, the MQTT link.

The outbox needs the link keys (it stores sealed envelopes), so it exists only when a
coordinator key is configured; without one the agent serves HTTP only. The link needs the
outbox and a broker URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dgdm.agent import __version__
from dgdm.agent.config import AgentConfig

if TYPE_CHECKING:
    # sync's modules load when a coordinator key is configured, not before.
    from dgdm.sync.crypto import LinkKeys
    from dgdm.sync.envelope import Kind
    from dgdm.sync.link import CommandHandler, DeviceLink
    from dgdm.sync.outbox import Outbox, Sealer


def open_outbox(
    config: AgentConfig, on_evict: Callable[[Kind, int], None]
) -> tuple[Outbox | None, LinkKeys | None]:
    """(outbox, link keys), or (None, None) without a coordinator key. Blocking."""
    if not config.sync.coordinator_public_key:
        return None, None
    from dgdm.sync.outbox import Outbox

    keys = link_keys(config)
    outbox = Outbox(
        config.device.data_dir / "outbox.db",
        device_id=config.device.id,
        sealer=_sealer(config, keys),
        max_bytes=config.sync.max_outbox_bytes,
        on_evict=on_evict,
    )
    return outbox, keys


def _sealer(config: AgentConfig, keys: LinkKeys) -> Sealer:
    from dgdm.sync.envelope import Kind, seal

    device_id = config.device.id
    plain_telemetry = not config.sync.encrypt_telemetry

    def sealer(kind: Kind, seq: int, created_ms: int, body: Any) -> bytes:
        key = None if plain_telemetry and kind == Kind.TELEMETRY else keys.up
        return seal(kind, seq, created_ms, device_id, body, key=key, key_id=keys.key_id)

    return sealer


def link_keys(config: AgentConfig) -> LinkKeys:
    from dgdm.sync.crypto import derive_link_keys, load_private_key, load_public_key, raw_public

    own = load_private_key(config.device.private_key)
    peer = load_public_key(config.sync.coordinator_public_key or "")
    return derive_link_keys(own, peer, config.device.id, raw_public(own), raw_public(peer))


def make_link(
    config: AgentConfig,
    outbox: Outbox | None,
    keys: LinkKeys | None,
    on_command: CommandHandler,
    backend: Callable[[], str],
) -> DeviceLink | None:
    """The `DeviceLink` (not started yet), or None without a broker (or an outbox)."""
    if not config.sync.broker_url or outbox is None or keys is None:
        return None
    from dgdm.sync.link import DeviceLink
    from dgdm.sync.mqtt import options_from_settings

    sync = config.sync
    options = options_from_settings(sync, client_id=f"dgdm-agent-{config.device.id}")
    return DeviceLink(
        outbox,
        options,
        device_id=config.device.id,
        keys=keys,
        on_command=on_command,
        agent_version=__version__,
        backend=backend,
        receipt_timeout_s=sync.receipt_timeout_s,
    )
