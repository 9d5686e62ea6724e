"""`dgdm coordinator backup --out FILE` and `dgdm coordinator restore FILE` (SQLite stores;
a PostgreSQL store is backed up with `pg_dump`). The work is in `sync/backup.py`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dgdm.sync.coordinator.config import CoordinatorConfig

PG_BACKUP = (
    "is a PostgreSQL store: back it up with pg_dump --format=custom and restore it with"
    " pg_restore (README: Back up and restore); dgdm backs up SQLite stores only"
)


def register(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_backup_and_restore(actions, "coordinator", "the SQLite store", _backup, _restore)


def add_backup_and_restore(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    service: str,
    contents: str,
    backup: Callable[[argparse.Namespace], int],
    restore: Callable[[argparse.Namespace], int],
) -> None:
    """`backup --out FILE` and `restore FILE`, the same for the agent and the coordinator."""
    backup_parser = actions.add_parser(
        "backup", help=f"copy {contents} to FILE while the {service} runs"
    )
    backup_parser.add_argument(
        "--out", type=Path, required=True, help="the backup file (made 0600)"
    )
    config_arg(backup_parser, service)
    backup_parser.set_defaults(func=backup)
    restore_parser = actions.add_parser(
        "restore", help=f"replace {contents} by a backup (the {service} stopped)"
    )
    restore_parser.add_argument("file", type=Path, metavar="FILE", help="a file of `backup --out`")
    config_arg(restore_parser, service)
    restore_parser.set_defaults(func=restore)


def config_arg(parser: argparse.ArgumentParser, service: str) -> None:
    # SUPPRESS: a --config given before the action is not reset by this one's default.
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"TOML file (default /etc/dgdm/{service}.toml)",
    )


def sqlite_store(args: argparse.Namespace, action: str) -> tuple[CoordinatorConfig, Path]:
    from dgdm.sync.coordinator.config import load_config, validate_store
    from dgdm.sync.coordinator.stores import parse_store_url
    from dgdm.sync.errors import ConfigError

    config = load_config(getattr(args, "config", None))
    validate_store(config)
    target = parse_store_url(config.store.url, config.coordinator.data_dir)
    if target.path is None:
        raise ConfigError("store.url", PG_BACKUP)
    if action == "backup" and not target.path.is_file():
        raise ConfigError("store.url", f"there is no SQLite store at {target.path} to back up")
    return config, target.path


def _parts(path: Path) -> list[Any]:
    from dgdm.sync.backup import COORDINATOR, Part

    return [Part("coordinator.db", path, COORDINATOR)]


def _backup(args: argparse.Namespace) -> int:
    from dgdm.sync import backup

    config, path = sqlite_store(args, "backup")
    manifest = backup.create(
        args.out, "coordinator", _parts(path), {"coordinator_id": config.coordinator.id}
    )
    print(backup.summary(manifest, args.out))
    return 0


def _restore(args: argparse.Namespace) -> int:
    from dgdm.sync import backup, datalock
    from dgdm.sync.errors import ConfigError

    if not args.file.is_file():
        raise ConfigError("FILE", f"{args.file} is not a file")
    _, path = sqlite_store(args, "restore")
    parts = _parts(path)
    with backup.scratch(path.parent, ".dgdm-restore-") as staging:
        manifest = backup.read(args.file, "coordinator", staging)
        backup.advance_seqs(staging, manifest, backup.seq_floor())
        with datalock.take_exclusive(datalock.beside(path), "coordinator"):
            aside = backup.install(staging, parts, manifest["parts"])
    print(backup.restored(manifest, args.file, aside))
    return 0
