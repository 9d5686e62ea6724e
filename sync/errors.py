"""Errors raised by the sync layer, rooted in the shared `DgdmError`."""

from __future__ import annotations

from dgdm.common.errors import DgdmError


class SyncError(DgdmError):
    """Something went wrong between an outbox and the coordinator."""


class ConfigError(SyncError):
    """A configuration value is missing, unknown or invalid. `key` is e.g. ``sync.broker_url``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config {key}: {message}")
        self.key = key
        self.message = message


class KeyFileError(SyncError):
    """A key file is missing, unreadable, malformed or has unsafe permissions."""


class EnvelopeError(SyncError):
    """An envelope was rejected. `reason` is a short stable code used in counters and logs:
    malformed, bad_magic, bad_version, bad_flags, bad_kind, bad_key_id, bad_tag,
    device_mismatch, expired, replay, too_large, bad_body, unencrypted (a plaintext
    envelope where encryption is required)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class OutboxError(SyncError):
    """The outbox database cannot accept or serve a request."""


class OutboxFull(OutboxError):
    """The outbox is full and nothing more urgent-less could be evicted for this message."""


class StorageFull(OutboxError):
    """The disk (or the configured page cap) is full; reads and deletes still work."""


class TransportError(SyncError):
    """The MQTT connection failed or is not connected."""
