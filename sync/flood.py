"""A hostile (or buggy) device with its own real key: valid sealed telemetry with fresh
seqs, as fast as one plain socket gets it through the broker (pre-built MQTT 3.1.1 QoS 1
frames, PUBACKs read and ignored). Used by the flood test and `dgdm bench fleet
--noisy-neighbour` to prove that one device cannot starve the others.

`python -m dgdm.sync.flood HOST PORT DEVICE_ID DEVICE_KEY COORD_PUB SECONDS OUT`: prints
nothing; OUT gets {"sent": N, "seconds": S} when it is done.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

from dgdm.sync.crypto import derive_link_keys, load_private_key, load_public_key, raw_public
from dgdm.sync.envelope import Kind, seal
from dgdm.sync.mqtt_wire import encode_length, encode_publish, encode_topic

FRAMES = 40_000
CHUNK = 256


def connect_frame(client_id: str) -> bytes:
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"  # 3.1.1, clean session, keepalive 60 s
    payload = len(cid).to_bytes(2, "big") + cid
    return b"\x10" + encode_length(len(variable) + len(payload)) + variable + payload


def frames(device_id: str, key_path: str, coord_pub: str, seq_base: int) -> list[bytes]:
    own = load_private_key(key_path)
    peer = load_public_key(coord_pub)
    keys = derive_link_keys(own, peer, device_id, raw_public(own), raw_public(peer))
    topic = encode_topic(f"dgdm/v1/{device_id}/telemetry")
    now = int(time.time() * 1000)
    body = {"samples": [{"ts_ms": now, "cpu_percent": 1.0, "mem_used_bytes": 1}]}
    out = []
    for i in range(FRAMES):
        env = seal(
            Kind.TELEMETRY, seq_base + i, now, device_id, body, key=keys.up, key_id=keys.key_id
        )
        out.append(encode_publish(topic, i % 65535 + 1, env, qos=1, retain=False, v5=False))
    return out


def flood(
    host: str, port: int, *, device_id: str, key_path: str, coord_pub: str, seconds: float
) -> dict[str, float]:
    """Publish for `seconds`; {"sent": messages written, "seconds": elapsed}. The frames
    repeat every FRAMES messages: a replayed seq is a duplicate the coordinator must drop
    cheaply, which is part of the flood."""
    # Seqs above any the device's honest outbox would use (ms clock x 1000).
    built = frames(device_id, key_path, coord_pub, int(time.time() * 1000) * 1000)
    chunks = [b"".join(built[i : i + CHUNK]) for i in range(0, len(built), CHUNK)]
    sock = socket.create_connection((host, port))
    try:
        sock.sendall(connect_frame(f"flood-{device_id}"))
        sock.recv(4)  # CONNACK
        sent = 0
        start = time.monotonic()
        deadline = start + seconds
        i = 0
        while time.monotonic() < deadline:
            sock.setblocking(True)
            sock.sendall(chunks[i % len(chunks)])
            sock.setblocking(False)
            sent += CHUNK
            i += 1
            try:
                while sock.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    return {"sent": sent, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgdm.sync.flood", description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("device_id")
    parser.add_argument("device_key", help="the device's private key file")
    parser.add_argument("coord_pub", help="the coordinator's public key (base64)")
    parser.add_argument("seconds", type=float)
    parser.add_argument("out", type=Path, help="where the JSON figures go")
    args = parser.parse_args(argv)
    figures = flood(
        args.host,
        args.port,
        device_id=args.device_id,
        key_path=args.device_key,
        coord_pub=args.coord_pub,
        seconds=args.seconds,
    )
    args.out.write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
