"""The fleet's link keys: each enrolled device's public key, paired with the coordinator's
private key into that device's `LinkKeys` (derived once, cached). An unknown device
triggers a re-read of the store, at most once a second, so a device enrolled with
`dgdm coordinator devices add` while the service runs is picked up without a restart; and
the store is re-read every REFRESH_S anyway, so a device withdrawn with `devices remove` is
refused within that time."""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dgdm.sync.crypto import LinkKeys, derive_link_keys, load_public_key, raw_public
from dgdm.sync.errors import KeyFileError

RELOAD_INTERVAL_S = 1.0
REFRESH_S = 5.0


class Registry:
    def __init__(
        self,
        private_key: X25519PrivateKey,
        load: Callable[[], dict[str, str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._private = private_key
        self.public_raw = raw_public(private_key)
        self._load = load
        self._clock = clock
        self._public: dict[str, str] = {}
        self._keys: dict[str, LinkKeys] = {}
        self._loaded_at = float("-inf")

    def reload(self) -> None:
        """Re-read the enrolled keys; link keys of a device whose key changed are dropped."""
        fresh = self._load()
        self._keys = {d: k for d, k in self._keys.items() if fresh.get(d) == self._public.get(d)}
        self._public = fresh
        self._loaded_at = self._clock()

    def keys_for(self, device_id: str, key_id: bytes | None = None) -> LinkKeys | None:
        """The device's link keys, or None when it is not enrolled (or its key is unusable).

        `key_id` is an incoming envelope's: when it differs from the cached keys' the device
        may have been re-enrolled with a rotated key (by `dgdm coordinator devices add` in
        another process), so the enrolment is re-read, at most once a second, before the
        envelope is judged. No restart is needed after a key rotation.
        """
        if self._clock() - self._loaded_at >= REFRESH_S:
            self.reload()
        keys = self._keys.get(device_id)
        if keys is not None and (key_id is None or key_id == keys.key_id):
            return keys
        if self._clock() - self._loaded_at >= RELOAD_INTERVAL_S:
            self.reload()
            keys = self._keys.get(device_id)
            if keys is not None:
                return keys
        text = self._public.get(device_id)
        if text is None:
            return None
        try:
            peer = load_public_key(text)
            keys = derive_link_keys(
                self._private, peer, device_id, raw_public(peer), self.public_raw
            )
        except KeyFileError:
            return None
        self._keys[device_id] = keys
        return keys

    def count(self) -> int:
        """Devices enrolled, as last read from the store."""
        return len(self._public)

    def enrolled(self, device_id: str) -> bool:
        return self.keys_for(device_id) is not None
