"""Key rotation and removal reach a running coordinator without a restart."""

from __future__ import annotations

from pathlib import Path

from dgdm.sync.coordinator.registry import REFRESH_S, Registry
from dgdm.sync.coordinator.store import SqliteStore
from dgdm.sync.crypto import generate_keypair, load_private_key


def keypair(directory: Path, name: str) -> str:
    return generate_keypair(directory, name=name)[2]


def test_a_rotated_device_key_is_picked_up_by_key_id(tmp_path: Path) -> None:
    coordinator_b64 = keypair(tmp_path, "coordinator")
    private = load_private_key(tmp_path / "coordinator.key")
    store = SqliteStore(tmp_path / "coordinator.db")
    now = [100.0]
    registry = Registry(private, store.public_keys, clock=lambda: now[0])
    assert coordinator_b64

    store.add_device("edge-1", keypair(tmp_path / "old", "device"))
    old = registry.keys_for("edge-1")
    assert old is not None

    # Another process (`dgdm coordinator devices add`) enrols a rotated key.
    store.add_device("edge-1", keypair(tmp_path / "new", "device"))
    unknown_id = bytes(a ^ 0xFF for a in old.key_id)
    assert registry.keys_for("edge-1") == old  # no envelope says otherwise yet
    assert registry.keys_for("edge-1", unknown_id) == old  # re-read at most once a second
    now[0] += 1.5
    rotated = registry.keys_for("edge-1", unknown_id)
    assert rotated is not None
    assert rotated.key_id != old.key_id
    assert registry.keys_for("edge-1", rotated.key_id) == rotated
    store.close()


def test_an_unchanged_key_keeps_its_cached_link_keys(tmp_path: Path) -> None:
    keypair(tmp_path, "coordinator")
    store = SqliteStore(tmp_path / "coordinator.db")
    registry = Registry(load_private_key(tmp_path / "coordinator.key"), store.public_keys)
    store.add_device("edge-2", keypair(tmp_path / "d", "device"))
    first = registry.keys_for("edge-2")
    registry.reload()
    assert registry.keys_for("edge-2") is first
    store.close()


def test_a_removed_device_is_refused_within_the_refresh_interval(tmp_path: Path) -> None:
    keypair(tmp_path, "coordinator")
    store = SqliteStore(tmp_path / "coordinator.db")
    now = [100.0]
    registry = Registry(
        load_private_key(tmp_path / "coordinator.key"), store.public_keys, clock=lambda: now[0]
    )
    store.add_device("edge-3", keypair(tmp_path / "d", "device"))
    keys = registry.keys_for("edge-3")
    assert keys is not None

    # Another process (`dgdm coordinator devices remove`) withdraws the enrolment.
    assert store.remove_device("edge-3")
    assert not store.remove_device("edge-3")  # already withdrawn
    assert registry.keys_for("edge-3", keys.key_id) == keys  # cached until the refresh
    now[0] += REFRESH_S
    assert registry.keys_for("edge-3", keys.key_id) is None
    assert not registry.enrolled("edge-3")
    assert store.device("edge-3") is not None  # its history stays

    store.add_device("edge-3", keypair(tmp_path / "d2", "device"))  # enrolled again
    now[0] += REFRESH_S
    assert registry.enrolled("edge-3")
    store.close()
