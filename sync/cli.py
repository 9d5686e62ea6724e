"""`dgdm keys`, `dgdm coordinator` (the service, `devices add|remove|tag|untag|quota|list`,
`jobs create|list|show|cancel`) and `dgdm telemetry watch`.

The `devices` and `jobs` actions open the same `[store]` as the service and work on it
directly (no API token needed, a running coordinator need not be up): the host's own
user who may read the store may manage the fleet, as with enrolment.

Registration imports nothing heavy; each command imports its work when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgdm.sync.wallclock import now_ms

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
    add.add_argument(
        "--tag",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a tag (repeatable); given, they become the device's tags, replacing any",
    )
    _config_arg(add, nested=True)
    add.set_defaults(func=_devices_add)
    tag = dev_actions.add_parser(
        "tag", help="set tags on a device (a key it has gets the new value)"
    )
    tag.add_argument("device_id")
    tag.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    tag.add_argument("--replace", action="store_true", help="exactly these tags (none: clear all)")
    _config_arg(tag, nested=True)
    tag.set_defaults(func=_devices_tag)
    untag = dev_actions.add_parser("untag", help="remove tags from a device by key")
    untag.add_argument("device_id")
    untag.add_argument("keys", nargs="+", metavar="KEY")
    _config_arg(untag, nested=True)
    untag.set_defaults(func=_devices_untag)
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
    show = dev_actions.add_parser("list", help="list enrolled devices (with tags) as JSON lines")
    _config_arg(show, nested=True)
    show.set_defaults(func=_devices_list)
    _register_jobs(actions)


def _register_jobs(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = actions.add_parser("jobs", help="one command to a group of devices")
    job_actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    create = job_actions.add_parser(
        "create", help="send a command to devices by tag, by id or to all (prints the job)"
    )
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--tag", action="append", metavar="KEY=VALUE", help="AND-ed, repeatable")
    who.add_argument("--id", action="append", dest="ids", metavar="DEVICE", help="repeatable")
    who.add_argument("--all", action="store_true", help="every enrolled device")
    create.add_argument("--cmd", required=True, help="ping, diffuse or set_config")
    create.add_argument("--args", default="{}", help="the command's args as a JSON object")
    for name, kind in (
        ("rate-per-s", float),
        ("max-failure-ratio", float),
        ("timeout-s", float),
        ("ttl-ms", int),
    ):
        create.add_argument(f"--{name}", type=kind, default=None)
    _config_arg(create, nested=True)
    create.set_defaults(func=_jobs_create)
    listing = job_actions.add_parser("list", help="jobs, newest first, as JSON lines")
    listing.add_argument("--limit", type=int, default=50)
    _config_arg(listing, nested=True)
    listing.set_defaults(func=_jobs_list)
    show = job_actions.add_parser("show", help="a job, its counts and every device's state")
    show.add_argument("job_id", type=int)
    _config_arg(show, nested=True)
    show.set_defaults(func=_jobs_show)
    cancel = job_actions.add_parser("cancel", help="cancel a job's devices not sent to yet")
    cancel.add_argument("job_id", type=int)
    _config_arg(cancel, nested=True)
    cancel.set_defaults(func=_jobs_cancel)

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
    tags = None if args.tag is None else _tags(args.tag)
    _, store = _open_store(args)
    try:
        store.add_device(
            args.device_id,
            args.public_key,
            plaintext_telemetry=args.plaintext_telemetry,
            tags=tags,
        )
    finally:
        store.close()
    plaintext = " (plaintext telemetry accepted)" if args.plaintext_telemetry else ""
    tagged = f" tagged {_tag_text(tags)}" if tags else ""
    print(f"enrolled {args.device_id}{plaintext}{tagged}")
    return 0


def _tags(texts: list[str]) -> dict[str, str]:
    """KEY=VALUE arguments, or exit 2 naming the bad tag."""
    from dgdm.sync.coordinator.tags import TagError, parse_tags
    from dgdm.sync.errors import ConfigError

    try:
        return parse_tags(texts)
    except TagError as exc:
        raise ConfigError(exc.field, exc.message) from exc


def _tag_text(tags: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(tags.items()))


def _devices_tag(args: argparse.Namespace) -> int:
    from dgdm.sync.coordinator.tags import TagError
    from dgdm.sync.errors import ConfigError

    if not args.tags and not args.replace:
        raise ConfigError("tags", "give at least one KEY=VALUE (or --replace to clear all)")
    tags = _tags(args.tags)
    _, store = _open_store(args)
    try:
        if not store.tag(args.device_id, tags, replace=args.replace):
            raise ConfigError("device_id", f"{args.device_id!r} is not enrolled")
        now = store.tags().get(args.device_id, {})
    except TagError as exc:
        raise ConfigError(exc.field, exc.message) from exc
    finally:
        store.close()
    print(f"{args.device_id}: {_tag_text(now) or 'no tags'}")
    return 0


def _devices_untag(args: argparse.Namespace) -> int:
    from dgdm.sync.coordinator.tags import check_key
    from dgdm.sync.errors import ConfigError

    keys = [_checked(check_key, k) for k in args.keys]
    _, store = _open_store(args)
    try:
        if not store.untag(args.device_id, keys):
            raise ConfigError("device_id", f"{args.device_id!r} is not enrolled")
        now = store.tags().get(args.device_id, {})
    finally:
        store.close()
    print(f"{args.device_id}: {_tag_text(now) or 'no tags'}")
    return 0


def _checked(check: Any, value: str) -> Any:
    from dgdm.sync.coordinator.tags import TagError
    from dgdm.sync.errors import ConfigError

    try:
        return check(value)
    except TagError as exc:
        raise ConfigError(exc.field, exc.message) from exc


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
        tags = store.tags()
        for row in store.devices():
            row["tags"] = tags.get(row["device_id"], {})
            print(json.dumps(row, sort_keys=True))
    finally:
        store.close()
    return 0


def _jobs_create(args: argparse.Namespace) -> int:
    import json

    from dgdm.sync.coordinator.jobs import BadJob, parse_job
    from dgdm.sync.errors import ConfigError

    try:
        command_args = json.loads(args.args)
    except ValueError as exc:
        raise ConfigError("--args", f"is not JSON: {exc}") from exc
    target: Any = "all" if args.all else {"ids": args.ids} if args.ids else {}
    if args.tag:
        target = {"tags": _tags(args.tag)}
    body: dict[str, Any] = {"target": target, "command": {"cmd": args.cmd, "args": command_args}}
    for name in ("rate_per_s", "max_failure_ratio", "timeout_s", "ttl_ms"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    _, store = _open_store(args)
    try:
        job = store.create_job(parse_job(body), now_ms())
    except BadJob as exc:
        raise ConfigError(exc.field, str(exc).split(": ", 1)[-1]) from exc
    finally:
        store.close()
    print(json.dumps(job, sort_keys=True))
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    import json

    _, store = _open_store(args)
    try:
        for job in store.jobs(max(1, args.limit)):
            print(json.dumps(job, sort_keys=True))
    finally:
        store.close()
    return 0


def _jobs_show(args: argparse.Namespace) -> int:
    import json

    from dgdm.sync.errors import ConfigError

    _, store = _open_store(args)
    try:
        job = store.job(args.job_id)
        if job is None:
            raise ConfigError("job_id", f"no job {args.job_id}")
        devices: list[dict[str, Any]] = []
        while page := store.job_targets(
            args.job_id, devices[-1]["device_id"] if devices else "", 1000
        ):
            devices += page
    finally:
        store.close()
    print(json.dumps({**job, "devices": devices}, sort_keys=True, indent=2))
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    import json

    from dgdm.sync.errors import ConfigError

    _, store = _open_store(args)
    try:
        job = store.cancel_job(args.job_id, now_ms())
    finally:
        store.close()
    if job is None:
        raise ConfigError("job_id", f"no job {args.job_id}")
    print(json.dumps(job, sort_keys=True))
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
