"""`dgdm keys`, `dgdm coordinator` (the service, `devices add|remove|list`) and `dgdm telemetry
watch`.

Registration imports nothing heavy; each command imports its work when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dgdm.sync.coordinator.config import CoordinatorConfig
    from dgdm.sync.coordinator.store import Store


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from dgdm.sync import keys_cli

    keys_cli.register(subparsers)
    _register_coordinator(subparsers)
    _register_telemetry(subparsers)


def _config_arg(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    # A nested --config must not reset one given before the action (argparse copies
    # sub-parser defaults over the parent's values), hence SUPPRESS there.
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS if nested else None,
        help="TOML file (default /etc/dgdm/coordinator.toml)",
    )


def _register_coordinator(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    coord = subparsers.add_parser(
        "coordinator", help="run the cloud coordinator or manage its fleet"
    )
    _config_arg(coord)
    coord.set_defaults(func=_run_coordinator)
    actions = coord.add_subparsers(dest="coordinator_command", metavar="ACTION")
    devices = actions.add_parser("devices", help="the fleet registry")
    dev_actions = devices.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    add = dev_actions.add_parser("add", help="enrol a device with its public key")
    add.add_argument("device_id")
    add.add_argument("--public-key", required=True, help="base64 of the raw 32-byte X25519 key")
    add.add_argument(
        "--plaintext-telemetry",
        action="store_true",
        help="accept its unencrypted telemetry (sync.encrypt_telemetry = false); never receipted,"
        " since anyone on the path could forge it",
    )
    _config_arg(add, nested=True)
    add.set_defaults(func=_devices_add)
    remove = dev_actions.add_parser(
        "remove", help="withdraw a device's enrolment: its messages are refused from then on"
    )
    remove.add_argument("device_id")
    _config_arg(remove, nested=True)
    remove.set_defaults(func=_devices_remove)
    quota = dev_actions.add_parser(
        "quota",
        help="a device's own ingest rates over the [ingest] defaults (running coordinators"
        " apply them within 5 s)",
    )
    quota.add_argument("device_id")
    for key in ("result", "telemetry", "alert", "reply"):
        quota.add_argument(f"--{key}-per-s", type=float, help=f"{key} messages per second")
    quota.add_argument("--bytes-per-s", type=float, help="bytes per second, all kinds")
    quota.add_argument("--clear", action="store_true", help="back to the [ingest] defaults")
    _config_arg(quota, nested=True)
    quota.set_defaults(func=_devices_quota)
    show = dev_actions.add_parser("list", help="list enrolled devices as JSON lines")
    _config_arg(show, nested=True)
    show.set_defaults(func=_devices_list)

    from dgdm.sync import backup_cli

    backup_cli.register(actions)


def _register_telemetry(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    telemetry = subparsers.add_parser("telemetry", help="fleet telemetry")
    actions = telemetry.add_subparsers(dest="telemetry_command", metavar="ACTION", required=True)
    watch = actions.add_parser("watch", help="print decrypted telemetry live as JSON lines")
    watch.add_argument("--device", default=None, help="one device id (default: the whole fleet)")
    _config_arg(watch)
    watch.set_defaults(func=_telemetry_watch)


def _run_coordinator(args: argparse.Namespace) -> int:
    import asyncio

    from dgdm.sync.coordinator.config import load_config, validate
    from dgdm.sync.coordinator.runner import serve

    config = load_config(args.config)
    validate(config)
    return asyncio.run(serve(config))


def _open_store(args: argparse.Namespace) -> tuple[CoordinatorConfig, Store]:
    """The same `[store]` as the service (SPEC §7.1)."""
    from dgdm.sync.coordinator.config import load_config, validate_store
    from dgdm.sync.coordinator.stores import open_store

    config = load_config(args.config)
    validate_store(config)
    return config, open_store(config)


def _devices_add(args: argparse.Namespace) -> int:
    from dgdm.sync.crypto import load_public_key
    from dgdm.sync.envelope import valid_device_id
    from dgdm.sync.errors import ConfigError, KeyFileError

    if not valid_device_id(args.device_id):
        raise ConfigError("device_id", "must match [A-Za-z0-9._-]{1,64}")
    try:
        load_public_key(args.public_key)
    except KeyFileError as exc:
        raise ConfigError("--public-key", str(exc)) from exc
    _, store = _open_store(args)
    try:
        store.add_device(
            args.device_id, args.public_key, plaintext_telemetry=args.plaintext_telemetry
        )
    finally:
        store.close()
    plaintext = " (plaintext telemetry accepted)" if args.plaintext_telemetry else ""
    print(f"enrolled {args.device_id}{plaintext}")
    return 0


def _devices_remove(args: argparse.Namespace) -> int:
    from dgdm.sync.errors import ConfigError

    _, store = _open_store(args)
    try:
        removed = store.remove_device(args.device_id)
    finally:
        store.close()
    if not removed:
        raise ConfigError("device_id", f"{args.device_id!r} is not enrolled")
    print(f"removed {args.device_id} (a running coordinator refuses it within 5 s)")
    return 0


def _devices_quota(args: argparse.Namespace) -> int:
    import json

    from dgdm.sync.coordinator.quota import OVERRIDE_KEYS
    from dgdm.sync.errors import ConfigError

    given = {k: getattr(args, k) for k in OVERRIDE_KEYS if getattr(args, k) is not None}
    for key, value in given.items():
        if not value > 0 or value == float("inf"):
            raise ConfigError(key.replace("_", "-"), "must be a positive number")
    if args.clear == bool(given):
        raise ConfigError("quota", "give --clear, or at least one rate")
    _, store = _open_store(args)
    try:
        if not store.set_quota(args.device_id, given or None):
            raise ConfigError("device_id", f"{args.device_id!r} is not enrolled")
    finally:
        store.close()
    print(f"quota of {args.device_id}: {json.dumps(given) if given else 'the [ingest] defaults'}")
    return 0


def _devices_list(args: argparse.Namespace) -> int:
    import json

    _, store = _open_store(args)
    try:
        for row in store.devices():
            print(json.dumps(row, sort_keys=True))
    finally:
        store.close()
    return 0


def _telemetry_watch(args: argparse.Namespace) -> int:
    import asyncio

    from dgdm.sync.coordinator.config import load_config, validate
    from dgdm.sync.coordinator.watch import watch

    config = load_config(args.config)
    validate(config)
    try:
        return asyncio.run(watch(config, args.device))
    except KeyboardInterrupt:
        return 0
